"""Where the dispatcher gets latency tables: a start-up profile through the real pool, then live samples."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Collection, Protocol

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
NODE_GONE_S = 60.0
"""A node without a live worker for this long loses its own learners (their child processes stop); back, it
gets new ones, seeded again from its kernel table."""
NODE_CHECK_S = 5.0
"""How often :class:`NodeLearners` looks for nodes gone or back."""


class LatencySource(Protocol):
    def table(self, model: str, node: str = "") -> LatencyTable:
        """The latest published table (O(1), no fitting); ``node``: for a worker on that node (a node
        without a table of its own gets the model's)."""
        ...

    def observe(self, model: str, sample: LatencySample, node: str = "") -> None:
        """A live measurement from a worker on ``node`` (O(1); any refit happens off the event loop)."""
        ...


class StaticLatency:
    """Fixed tables (tests, and policies that never learn), per model and optionally per (model, node)."""

    def __init__(self, tables: dict[str, LatencyTable],
                 node_tables: dict[tuple[str, str], LatencyTable] | None = None) -> None:
        self._tables = tables
        self.node_tables = dict(node_tables or {})
        self.samples: list[tuple[str, LatencySample]] = []
        self.node_samples: list[tuple[str, str, LatencySample]] = []

    def table(self, model: str, node: str = "") -> LatencyTable:
        return self.node_tables.get((model, node)) or self._tables[model]

    def observe(self, model: str, sample: LatencySample, node: str = "") -> None:
        self.samples.append((model, sample))
        self.node_samples.append((model, node, sample))


class LearnedLatency:
    """One OnlineLearner per model, and per (model, node) for workers on several nodes: live samples refit
    the model off the loop; tables are swapped whole.

    A node's learners are added once its first worker is up (:meth:`add_node`, seeded by
    :func:`node_rows`); until then, and for workers on this machine (node ""), the model's learner serves.
    Samples from a node with learners train only those: each node's table is its own."""

    def __init__(self, learners: dict[str, OnlineLearner]) -> None:
        self.learners = learners
        self.node_learners: dict[tuple[str, str], OnlineLearner] = {}
        """(model, node) -> that node's learner."""
        self._started: dict | None = None
        self._gone_since: dict[str, float] = {}
        """Node with learners -> when :meth:`drop_gone_nodes` first saw it without a live worker."""

    def table(self, model: str, node: str = "") -> LatencyTable:
        if node:
            learner = self.node_learners.get((model, node))
            if learner is not None:
                return learner.table
        return self.learners[model].table

    def observe(self, model: str, sample: LatencySample, node: str = "") -> None:
        if node:
            learner = self.node_learners.get((model, node))
            if learner is not None:
                learner.observe(sample)
                return
        self.learners[model].observe(sample)

    def nodes(self) -> list[str]:
        """Nodes with learners of their own."""
        return sorted({node for _, node in self.node_learners})

    def add_node(self, node: str, learners: dict[str, OnlineLearner]) -> None:
        """Serve ``node``'s tables from ``learners`` (model -> learner), started like the others if
        :meth:`start` was called."""
        if self._started is not None:
            for learner in learners.values():
                learner.start(**self._started)
        for model, learner in learners.items():
            self.node_learners[(model, node)] = learner

    def drop_gone_nodes(self, live: Collection[str], now_s: float,
                        after_s: float = NODE_GONE_S) -> dict[str, list[OnlineLearner]]:
        """Forget the learners of every node that has had no live worker (is not in ``live``) for ``after_s``,
        counted from the first call that found it so, and return them per node: the caller stops them (off
        the event loop: stopping joins a thread). Their batches, if the node comes back, use the model's."""
        dropped: dict[str, list[OnlineLearner]] = {}
        for node in self.nodes():
            if node in live:
                self._gone_since.pop(node, None)
                continue
            since = self._gone_since.setdefault(node, now_s)
            if now_s - since >= after_s:
                del self._gone_since[node]
                dropped[node] = [self.node_learners.pop(key) for key in list(self.node_learners) if key[1] == node]
        return dropped

    def start(self, process: bool = True, on_spawn: Callable[[int], None] | None = None,
              on_exit: Callable[[int], None] | None = None) -> None:
        """Start every learner's refit thread; ``process``: fits run in a child process (off the GIL)."""
        self._started = {"process": process, "on_spawn": on_spawn, "on_exit": on_exit}
        for learner in self._all():
            learner.start(process=process, on_spawn=on_spawn, on_exit=on_exit)

    def _all(self) -> list[OnlineLearner]:
        return [*self.learners.values(), *self.node_learners.values()]

    def wait_started(self, timeout: float | None = None) -> bool:
        """Every learner's thread (and child process) is up: see :meth:`OnlineLearner.wait_started`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return all(learner.wait_started(None if deadline is None else max(0.0, deadline - time.monotonic()))
                   for learner in self._all())

    def stop(self) -> None:
        self._started = None
        for learner in self._all():
            learner.stop()


class NodeLearners:
    """The learners of each node of a per-node pool (a Ray cluster), kept in ``latency``: fitted off the event
    loop when a node's first worker is ready (:meth:`node_up`), dropped when the node has had no live worker
    for ``gone_after_s`` and fitted again if it comes back (:meth:`check`, every NODE_CHECK_S in :meth:`run`),
    and never started after :meth:`stop`.

    ``build(node, node_tables)``: the node's learners, model -> learner; it runs in a thread, on a copy of
    the pool's ``node_tables`` (the loop may add a node meanwhile)."""

    def __init__(self, latency: LearnedLatency, pool: WorkerPool,
                 build: Callable[[str, dict[str, dict]], dict[str, OnlineLearner]],
                 gone_after_s: float = NODE_GONE_S) -> None:
        self.latency = latency
        self.pool = pool
        self.build = build
        self.gone_after_s = gone_after_s
        self.tasks: set[asyncio.Task] = set()
        """Additions under way."""
        self.seen: set[str] = set()
        """Nodes with learners, or with learners being fitted or that failed to fit."""
        self.stopped = False

    async def add(self, node: str) -> None:
        """Fit ``node``'s learners (off the loop) and serve its tables from them (once per node)."""
        if node in self.seen or self.stopped:
            return
        self.seen.add(node)
        tables = {name: dict(t) for name, t in getattr(self.pool, "node_tables", {}).items()}
        learners = await asyncio.to_thread(self.build, node, tables)
        if self.stopped:  # stop() came while they were fitted: they never start
            return
        self.latency.add_node(node, learners)
        log.info("node %s: latency tables of its own (%s)", node[:12], ", ".join(sorted(learners)))

    def node_up(self, node: str) -> None:
        """A node's first worker is ready (RayPool.on_node): give it learners of its own, off the loop."""
        if self.stopped:
            return
        task = asyncio.ensure_future(self.add(node))
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._added(node, t))

    def _added(self, node: str, task: asyncio.Future) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("node %s: its latency learners could not be fitted (its batches use the model's tables): "
                      "%s: %s", node[:12], type(exc).__name__, exc, exc_info=exc)

    async def check(self, now_s: float) -> list[str]:
        """Drop the learners of nodes gone for ``gone_after_s`` (stopping them off the loop) and give nodes
        that are back new ones; returns the nodes dropped."""
        live = {node for node, n in self.pool.node_workers().items() if n > 0}
        dropped = self.latency.drop_gone_nodes(live, now_s, self.gone_after_s)
        for node in dropped:
            self.seen.discard(node)
            log.info("node %s: no live worker for %.0f s; its latency learners stopped", node[:12],
                     self.gone_after_s)
        for node in sorted(live - self.seen):
            if node in getattr(self.pool, "node_tables", {}):
                self.node_up(node)
        learners = [learner for gone in dropped.values() for learner in gone]
        if learners:
            await asyncio.to_thread(lambda: [learner.stop() for learner in learners])
        return sorted(dropped)

    async def run(self, interval_s: float = NODE_CHECK_S) -> None:
        """:meth:`check` every ``interval_s`` until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.check(loop.time())
            except Exception:  # the next round tries again; the error is not lost in a task nobody awaits
                log.exception("checking the nodes' latency learners failed")

    async def stop(self) -> None:
        """No learner is added from now on: additions under way are cancelled (call it before stopping
        ``latency``, whose stop would miss a learner started after it)."""
        self.stopped = True
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def kernel_ms(kernel_table: dict, batch_size: int, level: float) -> float | None:
    """What a worker's start-up kernel table (``KernelChooser.to_json()``) measured for the kernel it runs
    (batch size, level) with: the nearest measured batch size at or above (the largest beyond the last), as
    the chooser picks; None if it measured nothing there."""
    table, timings = kernel_table.get("table") or {}, kernel_table.get("timings_ms") or {}
    sizes = sorted(int(b) for b in table)
    if not sizes:
        return None
    size = str(next((b for b in sizes if b >= batch_size), sizes[-1]))
    row = table[size]
    key = min(row, key=lambda lv: abs(float(lv) - level)) if row else None
    if key is None:
        return None
    kernel, sep, run_level = row[key].partition("@")
    cell = timings.get(size, {}).get(run_level if sep else key, {})
    ms = cell.get(kernel)
    return float(ms) if ms else None


def node_rows(rows: list[LatencySample], node_table: dict, reference: list[dict]) -> list[LatencySample]:
    """Seed rows for a node's latency model: ``rows`` (the profile or warm-up rows) with each exec ms scaled by
    how much slower the node's start-up kernel table (``node_table``, one model's) measured that (batch size,
    level) than the table of the machine the rows come from (``reference``: its kernel table, or with that
    unknown every node's, whose per-cell median then stands for it). A cell either table lacks is not scaled.
    The rows keep their contention: the model learns the node's own from its live samples."""
    ratios: dict[tuple[int, float], float] = {}
    out = []
    for row in rows:
        key = (row.batch_size, row.level)
        ratio = ratios.get(key)
        if ratio is None:
            mine = kernel_ms(node_table, *key)
            theirs = [ms for ms in (kernel_ms(t, *key) for t in reference) if ms]
            ratio = ratios[key] = mine / float(np.median(theirs)) if mine and theirs else 1.0
        out.append(row if ratio == 1.0 else replace(row, exec_ms=row.exec_ms * ratio))
    return out


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
                         seed: int = 0, nodes: list[str] | None = None,
                         node: str | None = None) -> list[LatencySample]:
    """Time every level at a few batch sizes on the real workers (distinct random inputs per call).

    The cold start when no profile exists: contention is whatever the monitor
    sees now; live samples teach the model the rest. ``nodes``: appended with each row's worker's node;
    ``node``: run on that node's workers while it has one (a per-node pool).
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
                result = await _run_with_one_retry(pool, BatchTask(task_id, manifest.name, level, x), node)
                task_id -= 1
                rows.append(LatencySample(level, b, contention(), result.exec_ms, result.kernel))
                if nodes is not None:
                    nodes.append(result.node)
    return rows


async def _run_with_one_retry(pool: WorkerPool, task: BatchTask, node: str | None = None):
    """Run ``task`` on the next idle worker (of ``node`` if it has one idle); once more if that worker dies
    (the server is not serving yet, so there is no scheduler to hand the retry to)."""
    for attempt in (1, 2):
        while pool.idle_count() == 0:
            if pool.broken():
                raise WorkerDied("no worker could be started for the warm-up sweep")
            await asyncio.sleep(0.01)
        try:
            return await (pool.submit(task, node) if node is not None else pool.submit(task))  # type: ignore[call-arg]
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
