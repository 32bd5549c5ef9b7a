"""The /proc readers and inputs bench_frontend and `slonn sweep` use (the benchmarks run a live server)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from slonn.scheduler.serverproc import child_pids, process_cpu_s
from slonn.scheduler.sweep import distinct_inputs

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


def test_child_pids_lists_a_spawned_child_and_not_this_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for all_threads in (False, True):
            kids = child_pids(os.getpid(), all_threads)
            assert proc.pid in kids and os.getpid() not in kids
    finally:
        proc.kill()
        proc.wait()


def test_child_pids_with_all_threads_finds_a_child_a_thread_started():
    import threading

    started: list[subprocess.Popen] = []
    spawned, done = threading.Event(), threading.Event()

    def spawn() -> None:  # stays alive while we look: a dead thread's children move to another thread
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]))
        spawned.set()
        done.wait(30)

    t = threading.Thread(target=spawn)
    t.start()
    try:
        assert spawned.wait(30)
        assert started[0].pid in child_pids(os.getpid(), all_threads=True)
        assert started[0].pid not in child_pids(os.getpid())  # the main thread's list misses it
    finally:
        done.set()
        t.join()
        started[0].kill()
        started[0].wait()


def test_inputs_are_distinct_per_call_and_digit_shaped():
    x = distinct_inputs(1000)
    assert x.shape == (1000, 64) and x.dtype == np.float32
    assert len(np.unique(x, axis=0)) == 1000  # more calls than held-out digits, still no repeat
