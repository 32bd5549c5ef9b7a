"""The worker process: load models once, then run BatchTasks until Shutdown or EOF."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch

from slonn.precision import DEFAULT_PRECISION
from slonn.workers.artifact import load_manifest
from slonn.workers.device import gpu_uuid
from slonn.workers.heap import freeze_startup_heap
from slonn.workers.placement import ask_niceness, set_cpus
from slonn.workers.protocol import BatchResult, BatchTask, Shutdown, WorkerFailure, WorkerReady
from slonn.workers.runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """How to start a worker (picklable: it crosses the spawn boundary)."""

    model_dirs: tuple[Path, ...]
    device: str = "auto"
    threads: int = 1
    calibrate: bool = True
    """Measure the kernel table at start-up (else the chooser's defaults)."""
    precision: str = DEFAULT_PRECISION
    """Weight precision (slonn.precision.PRECISIONS): "bf16"/"fp16" add the half kernels, "fp32" serves exact
    kernels only."""
    kernel_tables: dict = field(default_factory=dict)
    """model name -> a measured KernelChooser.to_json(); such models skip calibration (worker restarts)."""
    worker_spin_ms: float = 0.0
    """After each batch, poll for the next task for up to this long before blocking (see ``wait_for_task``)."""
    worker_nice: int | None = None
    """The worker's niceness (absolute), set before it loads anything; None: its parent's."""
    worker_cpus: tuple[int, ...] | None = None
    """The CPUs the worker may run on, set before it loads anything; None: its parent's."""


def load_runners(spec: WorkerSpec, failed: dict[str, str] | None = None) -> dict[str, ModelRunner]:
    """A runner per model of ``spec``. With ``failed`` given, a model that cannot be loaded is recorded there
    (its name -> the error) and the others load; without, the first such error is raised. A worker whose
    every model failed raises: it has nothing to serve."""
    torch.set_num_threads(spec.threads)
    runners = {}
    for directory in spec.model_dirs:
        try:
            runner = ModelRunner.load(Path(directory), spec.device, spec.precision)
        except Exception as exc:
            if failed is None:
                raise
            name = model_name(Path(directory))
            failed[name] = f"{type(exc).__name__}: {exc}"
            log.error("model %s (%s) could not be loaded; serving the others: %s", name, directory, failed[name])
            continue
        table = spec.kernel_tables.get(runner.manifest.name)
        if table:
            runner.use_kernel_table(table)
        elif spec.calibrate:
            runner.calibrate()
        runners[runner.manifest.name] = runner
    if not runners and failed:
        raise RuntimeError(f"no model could be loaded: {failed}")
    return runners


def model_name(directory: Path) -> str:
    """The name of the model in ``directory`` as its manifest gives it, or the directory's name when the
    manifest itself cannot be read."""
    try:
        return load_manifest(directory).name
    except Exception:  # noqa: BLE001 - a broken artifact is named as best we can
        return directory.name


def execute(runners: dict[str, ModelRunner], task: BatchTask, worker_id: int) -> BatchResult | WorkerFailure:
    """Run one task; an exception becomes a WorkerFailure (the worker stays up)."""
    try:
        out = runners[task.model].run(task.inputs, task.level)
    except Exception as exc:  # noqa: BLE001 - reported to the scheduler, which answers the batch
        log.exception("task %d failed", task.task_id)
        return WorkerFailure(task.task_id, worker_id, f"{type(exc).__name__}: {exc}")
    if len(out.outputs) != len(task.inputs):
        return WorkerFailure(task.task_id, worker_id,
                             f"model returned {len(out.outputs)} outputs for a batch of {len(task.inputs)}")
    return BatchResult(task.task_id, worker_id, out.outputs, out.exec_ms, out.kernel)


def warm_up(runners: dict[str, ModelRunner]) -> None:
    """One run per level so the first real batch does not pay allocation costs."""
    for runner in runners.values():
        x = np.zeros((1, runner.manifest.arch.in_features), np.float32)
        for level in runner.manifest.levels:
            runner.run(x, level)


def wait_for_task(conn: Connection, spin_s: float):
    """The next message on ``conn``: polled for up to ``spin_s`` (yielding the CPU to anything else runnable
    on it), then a blocking ``recv``.

    Why spin: on a VM, a worker that blocks between batches lets its vCPU go idle, and the hypervisor
    hands the physical core to someone else; the next batch then loses milliseconds to pauses in which
    the vCPU does not run at all. On a 2-vCPU VM (docs/results.md), sleeping 2 ms between calls
    cost 30-42% of the calls' wall time; polling through the same gaps cost under 4%
    (``python -m bench.noise`` against ``--spin``). The price is the core the poll keeps busy while traffic
    flows, bounded by ``spin_s`` after the last batch once it stops.
    """
    if spin_s > 0 and not conn.poll():
        t_end = time.perf_counter() + spin_s
        while not conn.poll():
            if time.perf_counter() >= t_end:
                break
            os.sched_yield()
    return conn.recv()


def worker_main(worker_id: int, spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a spawned worker process."""
    logging.basicConfig(level=logging.WARNING, format=f"worker{worker_id} %(levelname)s %(message)s")
    niceness = (os.getpriority(os.PRIO_PROCESS, 0) if spec.worker_nice is None
                else ask_niceness(spec.worker_nice, f"worker {worker_id}"))
    cpus = set_cpus(spec.worker_cpus)
    failed: dict[str, str] = {}
    runners = load_runners(spec, failed)
    warm_up(runners)
    freeze_startup_heap()
    device = next(iter(runners.values())).device
    conn.send(WorkerReady(failed=failed,
        worker_id=worker_id, pid=os.getpid(), device=str(device), gpu_uuid=gpu_uuid(device),
        models={name: r.manifest.to_json() for name, r in runners.items()},
        kernel_table={name: r.chooser.to_json() for name, r in runners.items()}, niceness=niceness, cpus=cpus,
    ))
    while True:
        try:
            msg = wait_for_task(conn, spec.worker_spin_ms * 1e-3)
        except (EOFError, OSError):
            return  # the scheduler went away
        if isinstance(msg, Shutdown):
            return
        conn.send(execute(runners, msg, worker_id))
