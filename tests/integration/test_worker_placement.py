"""A worker process and the co-runner run at the niceness and on the CPUs they were given."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

import pytest

from slonn.workers.corunner import CpuBurner
from slonn.workers.process import WorkerSpec, worker_main
from slonn.workers.protocol import Shutdown, WorkerReady

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="niceness and affinity per process")


def test_a_worker_sets_its_niceness_and_cpus_before_it_reports_ready(tiny_model_dir):
    nice = min(os.getpriority(os.PRIO_PROCESS, 0) + 3, 19)  # raising the niceness value needs no privilege
    cpu = max(os.sched_getaffinity(0))
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    spec = WorkerSpec((tiny_model_dir,), "cpu", calibrate=False, precision="fp32", worker_nice=nice,
                      worker_cpus=(cpu,))
    proc = ctx.Process(target=worker_main, args=(0, spec, theirs), daemon=True)
    proc.start()
    try:
        assert ours.poll(120), "worker did not report ready"
        ready = ours.recv()
        assert isinstance(ready, WorkerReady)
        assert (ready.niceness, ready.cpus, ready.gpu_uuid) == (nice, (cpu,), "")  # no GPU to watch on a CPU
        assert os.sched_getaffinity(proc.pid) == {cpu} and os.getpriority(os.PRIO_PROCESS, proc.pid) == nice
        ours.send(Shutdown())
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()


def test_the_corunner_runs_on_the_cpus_it_was_given():
    cpu = min(os.sched_getaffinity(0))
    burner = CpuBurner(n_procs=1, duty=0.2, cpus=(cpu,))
    burner.start()
    try:
        deadline = time.monotonic() + 30
        while os.sched_getaffinity(burner.pids[0]) != {cpu} and time.monotonic() < deadline:
            time.sleep(0.05)  # the child pins itself once it runs
        assert os.sched_getaffinity(burner.pids[0]) == {cpu}
    finally:
        burner.stop()


async def test_the_pool_knows_the_niceness_its_workers_got(tiny_model_dir):
    """The server judges its latency profile against it (scheduler.latency.base_rows)."""
    from slonn.workers.pool import ProcessPool

    nice = min(os.getpriority(os.PRIO_PROCESS, 0) + 2, 19)
    pool = ProcessPool(WorkerSpec((tiny_model_dir,), "cpu", calibrate=False, precision="fp32", worker_nice=nice))
    assert pool.niceness is None
    await pool.start()
    try:
        assert pool.niceness == nice and pool.gpu_uuid == ""
    finally:
        await pool.close()
