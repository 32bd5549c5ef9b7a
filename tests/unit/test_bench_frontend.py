"""bench_frontend's /proc readers and inputs (the benchmark itself runs a live server: scripts only)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from scripts.bench_frontend import children, distinct_inputs, process_cpu_s

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc (Linux)")


def test_process_cpu_counts_this_process_work():
    before = process_cpu_s(os.getpid())
    t_end = time.process_time() + 0.3
    while time.process_time() < t_end:
        pass
    assert process_cpu_s(os.getpid()) - before >= 0.2


def test_a_process_that_is_gone_has_no_cpu():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert process_cpu_s(proc.pid) == 0.0


def test_children_lists_a_spawned_child_and_not_this_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        kids = children(os.getpid())
        assert proc.pid in kids and os.getpid() not in kids
    finally:
        proc.kill()
        proc.wait()


def test_inputs_are_distinct_per_call_and_digit_shaped():
    x = distinct_inputs(1000)
    assert x.shape == (1000, 64) and x.dtype == np.float32
    assert len(np.unique(x, axis=0)) == 1000  # more calls than held-out digits, still no repeat
