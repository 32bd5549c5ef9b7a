"""Where the dispatcher gets latency tables: a start-up profile through the real pool, then live samples."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from slonn.policy.latency_model import LatencySample, foreign_kernels, profile_csv_name, profile_niceness, read_rows_csv
from slonn.policy.learner import OnlineLearner
from slonn.policy.table import LatencyTable
from slonn.precision import DEFAULT_PRECISION
from slonn.workers.artifact import ModelManifest
from slonn.workers.contract import RangeCheck
from slonn.workers.pool import WorkerDied, WorkerPool
from slonn.workers.protocol import BatchTask

log = logging.getLogger(__name__)

WARMUP_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


class LatencySource(Protocol):
    def table(self, model: str) -> LatencyTable:
        """The latest published table (O(1), no fitting)."""
        ...

    def observe(self, model: str, sample: LatencySample) -> None:
        """A live measurement (O(1); any refit happens off the event loop)."""
        ...


class StaticLatency:
    """Fixed tables (tests, and policies that never learn)."""

    def __init__(self, tables: dict[str, LatencyTable]) -> None:
        self._tables = tables
        self.samples: list[tuple[str, LatencySample]] = []

    def table(self, model: str) -> LatencyTable:
        return self._tables[model]

    def observe(self, model: str, sample: LatencySample) -> None:
        self.samples.append((model, sample))


class LearnedLatency:
    """One OnlineLearner per model: live samples refit the model off the loop; tables are swapped whole."""

    def __init__(self, learners: dict[str, OnlineLearner]) -> None:
        self.learners = learners

    def table(self, model: str) -> LatencyTable:
        return self.learners[model].table

    def observe(self, model: str, sample: LatencySample) -> None:
        self.learners[model].observe(sample)

    def start(self, process: bool = True, on_spawn: Callable[[int], None] | None = None,
              on_exit: Callable[[int], None] | None = None) -> None:
        """Start every learner's refit thread; ``process``: fits run in a child process (off the GIL)."""
        for learner in self.learners.values():
            learner.start(process=process, on_spawn=on_spawn, on_exit=on_exit)

    def wait_started(self, timeout: float | None = None) -> bool:
        """Every learner's thread (and child process) is up: see :meth:`OnlineLearner.wait_started`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return all(learner.wait_started(None if deadline is None else max(0.0, deadline - time.monotonic()))
                   for learner in self.learners.values())

    def stop(self) -> None:
        for learner in self.learners.values():
            learner.stop()


def base_rows(model_dir: Path, precision: str = DEFAULT_PRECISION,
              worker_nice: int | None = None, on_gpu: bool = False) -> list[LatencySample] | None:
    """The profile `slonn profile --precision` wrote beside the model for workers in ``precision``, if any;
    warns when it was taken at another niceness than ``worker_nice`` (None: this process's, which the
    workers inherit), or on the CPU for workers on a GPU (``on_gpu``)."""
    path = Path(model_dir) / profile_csv_name(precision)
    if not path.exists():
        return None
    rows, dicts = read_rows_csv(path, with_extra=True)
    foreign = foreign_kernels(rows, precision)
    if foreign:
        log.warning("%s was profiled with kernels %s that %s workers do not have: retake it with "
                    "`slonn profile --precision %s`", path, sorted(foreign), precision, precision)
    serving_nice = os.getpriority(os.PRIO_PROCESS, 0) if worker_nice is None else worker_nice
    mismatch = niceness_mismatch(dicts, serving_nice)
    if mismatch:
        log.warning("%s: %s", path, mismatch)
    if on_gpu and not profiled_on_gpu(dicts):
        log.warning("%s: profiled without a GPU signal (on the CPU), served on a GPU whose neighbours the "
                    "contention feature now counts: retake it on the GPU with `slonn profile --device cuda`", path)
    return rows


def profiled_on_gpu(profile_rows: list[dict]) -> bool:
    """Whether a profile's rows carry the GPU signal (its ``gpu`` column is filled when the profiled worker
    ran on a GPU that the monitor watched)."""
    return any(d.get("gpu") not in (None, "") for d in profile_rows)


def niceness_mismatch(profile_rows: list[dict], serving_nice: int) -> str | None:
    """Why a profile's latencies under contention do not describe workers at ``serving_nice`` (the workers'
    niceness: ``slonn serve --worker-nice``, else the server's, which they inherit), or None. Under
    co-runners a worker's latency depends on its CPU weight: on a 2-vCPU VM (docs/results.md), two
    busy co-runners make batches scatter 27% around the model at niceness 0 and 11% at -10. Profiles without
    the ``worker_nice`` column (older ones) are not judged."""
    try:
        nices = profile_niceness(profile_rows)
    except ValueError as exc:
        return f"{exc}: the profile's niceness is unknown"
    if not nices:
        return None
    if nices == [serving_nice]:
        return None
    return (f"profiled with the worker at niceness {', '.join(map(str, nices))}, served at {serving_nice}: "
            f"latencies under contention will differ until the online learner has refitted; retake it with "
            f"`slonn profile --worker-nice {serving_nice}`")


async def warmup_profile(pool: WorkerPool, manifest: ModelManifest, max_batch: int,
                         contention: Callable[[], float] = lambda: 0.0, repeats: int = 3,
                         seed: int = 0) -> list[LatencySample]:
    """Time every level at a few batch sizes on the real workers (distinct random inputs per call).

    The cold start when no profile exists: contention is whatever the monitor
    sees now; live samples teach the model the rest.
    """
    rng = np.random.default_rng(seed)
    sampler = RangeCheck(manifest.contract)  # inputs inside the model's training range
    rows: list[LatencySample] = []
    sizes = sorted({b for b in WARMUP_BATCH_SIZES if b <= max_batch} | {max_batch})
    task_id = -1
    for level in manifest.levels:
        for b in sizes:
            for _ in range(repeats):
                x = sampler.sample(b, int(rng.integers(1 << 31)))
                result = await _run_with_one_retry(pool, BatchTask(task_id, manifest.name, level, x))
                task_id -= 1
                rows.append(LatencySample(level, b, contention(), result.exec_ms, result.kernel))
    return rows


async def _run_with_one_retry(pool: WorkerPool, task: BatchTask):
    """Run ``task`` on the next idle worker; once more if that worker dies (the server is not serving yet,
    so there is no scheduler to hand the retry to)."""
    for attempt in (1, 2):
        while pool.idle_count() == 0:
            if pool.broken():
                raise WorkerDied("no worker could be started for the warm-up sweep")
            await asyncio.sleep(0.01)
        try:
            return await pool.submit(task)
        except WorkerDied:
            if attempt == 2:
                raise
            log.warning("warm-up task %d: its worker died; running it once more", task.task_id)


def linear_table(samples: list[LatencySample], levels: tuple[float, ...], max_batch: int, margin: float = 1.3,
                 floor_ms: float = 0.2) -> LatencyTable:
    """A contention-blind table: per level, least squares ms = a + b * batch; safe = margin * that + floor_ms.

    Not what the server uses (it learns a model from the same warm-up rows); kept as the simulator's
    "what if the planner ignored contention" baseline (``slonn simulate --planner-table linear``).
    """
    batch = np.arange(1, max_batch + 1)
    mean = np.empty((1, len(levels), max_batch))
    for i, level in enumerate(levels):
        pts = [(s.batch_size, s.exec_ms) for s in samples if s.level == level]
        if not pts:
            raise ValueError(f"no warm-up samples for level {level}")
        xs, ys = np.array(pts, dtype=float).T
        slope, intercept = np.polyfit(xs, ys, 1) if len(set(xs)) > 1 else (0.0, ys.mean())
        mean[0, i] = np.maximum(intercept + max(slope, 0.0) * batch, ys.min())
    safe = np.maximum.accumulate(mean * margin + floor_ms, axis=2)
    return LatencyTable(tuple(levels), max_batch, (), safe, mean)
