"""RayPool: the worker-pool interface on a Ray cluster, one Ray actor per worker.

Same contract as ProcessPool: one batch per worker at a time; a worker that dies (``ray.kill``, its node
lost, a crash) is noticed at once and replaced, and its batch's future raises WorkerDied, so the dispatcher
queues the requests again exactly once. Workers are placed by a placement group (one bundle of
``num_cpus``/``num_gpus`` per worker, PACK or SPREAD); the model artifacts go into Ray's object store once,
so worker nodes need no shared file system. Ray is an optional extra: importing this module does not
import it.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from slonn.workers.artifact import ModelManifest
from slonn.workers.pool import READY_LOG, TaskFailed, WorkerDied, WorkerPool
from slonn.workers.process import WorkerSpec
from slonn.workers.protocol import BatchResult, BatchTask, WorkerFailure
from slonn.workers.rayworker import RayReady, RayWorker, pack_artifacts

log = logging.getLogger(__name__)

RAY_MISSING = "the ray worker pool needs Ray, an optional extra: pip install 'slonn[ray]' (or -e '.[ray]')"
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
"""Placement-group strategies: PACK fills nodes in turn, SPREAD puts workers on as many nodes as it can;
STRICT_ refuses to place otherwise."""
REFRESH_S = 0.5
"""How often idle workers report their node's contention (busy ones report it with each result)."""
CALL_WINDOW = 1024
"""Recent batches whose Ray call overhead (submit to result, minus the model's time) is kept."""


def import_ray():
    """The ray module, or RuntimeError naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise RuntimeError(RAY_MISSING) from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Where and how the workers run on Ray."""

    address: str | None = None
    """Cluster to join ("auto": the one running on this node, or "host:port"); None starts a local Ray."""
    num_cpus: float = 1.0
    """CPUs each worker reserves (> 0)."""
    num_gpus: float = 0.0
    """GPUs each worker reserves (>= 0; fractions share a GPU)."""
    strategy: str = "SPREAD"
    """Placement-group strategy (STRATEGIES)."""
    place_timeout_s: float = 60.0
    """At start: how long the placement group may take to be placed. Serving: how long the pool may be
    without any live worker before it answers UNAVAILABLE (until one comes up again)."""
    local_object_store_mb: int = 200
    """Object store of a local Ray that the pool starts itself (address None)."""

    def __post_init__(self) -> None:
        if not self.num_cpus > 0 or not self.num_gpus >= 0:
            raise ValueError(f"ray num_cpus={self.num_cpus} must be > 0 and num_gpus={self.num_gpus} >= 0")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"ray strategy={self.strategy!r} must be one of {list(STRATEGIES)}")
        if not self.place_timeout_s > 0:
            raise ValueError(f"ray place_timeout_s={self.place_timeout_s} must be > 0")


class _Actor:
    __slots__ = ("worker_id", "handle", "node", "pid", "contention", "ready", "alive", "batches", "watch")

    def __init__(self, worker_id: int, handle: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.worker_id = worker_id
        self.handle = handle
        self.node = ""
        self.pid = 0
        self.contention = 0.0
        """Its node's contention, as reported with its latest result."""
        self.ready: asyncio.Future = loop.create_future()
        self.alive = True
        self.batches = 0
        self.watch: asyncio.Task | None = None


class RayPool(WorkerPool):
    """Workers as Ray actors across a cluster's nodes, replaced when they die."""

    per_node = True

    def __init__(self, spec: WorkerSpec, workers: int, options: RayOptions, *, monitor_factory: Callable[[], Any],
                 start_timeout_s: float = 300.0, task_timeout_s: float = 30.0) -> None:
        """``monitor_factory`` makes each actor's contention sampler on its own node (picklable: the class of
        policy.contention's monitor, or a partial of it)."""
        # Ray starts its workers at niceness 15 (RAY_worker_niceness), below everything else on the node; a
        # slonn worker runs at the frontend's, as a worker process inherits it (or at --worker-nice).
        if spec.worker_nice is None:
            spec = replace(spec, worker_nice=os.getpriority(os.PRIO_PROCESS, 0))
        self.spec = spec
        self.monitor_factory = monitor_factory
        self.n_workers = workers
        self.options = options
        self.start_timeout_s = start_timeout_s
        self.task_timeout_s = task_timeout_s
        """A batch running longer than this is taken as a hung (or unreachable) worker: killed and replaced."""
        self.manifests = {}
        self.failed = {}
        self.restarts = 0
        self.max_start_failures = 5
        """Consecutive workers dying before they are ready, after which the pool stops starting more."""
        self.call_overhead_ms: collections.deque[float] = collections.deque(maxlen=CALL_WINDOW)
        """Per batch: Ray's submit-to-result time minus the model's exec time."""
        self.ping_ms: list[float] = []
        """Round trips of empty calls at start (the overhead floor before any batch ran)."""
        self.node_tables: dict[str, dict] = {}
        """Node id -> the kernel tables a worker measured there (replacements on that node reuse them)."""
        self.on_node: Callable[[str], None] | None = None
        """Called with a node's id when its first worker is ready (its kernel table is in ``node_tables``)."""
        self.nodes_version = 0
        self._node_contention: dict[str, float] = {}
        self._workers: dict[int, _Actor] = {}
        self._idle: list[_Actor] = []
        self._ids = itertools.count()
        self._start_failures = 0
        self._gave_up = False
        self._closing = False
        self._own_ray = False
        self._empty_since: float | None = None
        self._empty_timer: asyncio.TimerHandle | None = None
        self._refresher: asyncio.Task | None = None

    # -- start ---------------------------------------------------------------

    async def start(self) -> None:
        ray = import_ray()
        from ray.util.placement_group import placement_group

        self._pg = None
        self._loop = asyncio.get_running_loop()
        opts = self.options
        if not ray.is_initialized():
            local = {} if opts.address else {"object_store_memory": opts.local_object_store_mb << 20}
            ray.init(address=opts.address, include_dashboard=False, logging_level=logging.WARNING, **local)
            self._own_ray = True
        self._artifacts = ray.put(pack_artifacts(self.spec.model_dirs))
        bundle = {"CPU": opts.num_cpus, **({"GPU": opts.num_gpus} if opts.num_gpus else {})}
        self._pg = placement_group([bundle] * self.n_workers, strategy=opts.strategy)
        try:
            await asyncio.wait_for(self._pg.ready(), opts.place_timeout_s)
        except asyncio.TimeoutError:
            message = (f"Ray could not place {self.n_workers} worker(s) of {bundle} each ({opts.strategy}) "
                       f"within {opts.place_timeout_s:g} s; the cluster has {ray.cluster_resources()}")
            await self.close()
            raise RuntimeError(message) from None
        self._actor_class = ray.remote(RayWorker)
        try:
            workers = [self._spawn() for _ in range(self.n_workers)]
            await asyncio.wait_for(asyncio.gather(*(w.ready for w in workers)), self.start_timeout_s)
            await self._time_calls(workers)
            self._refresher = asyncio.ensure_future(self._refresh_contention())
        except BaseException:
            await self.close()
            raise

    async def _time_calls(self, workers: list[_Actor]) -> None:
        for w in workers:  # Ray's own call overhead, before any batch: the dispatcher's first allowance
            for _ in range(10):
                t0 = time.perf_counter()
                self._reported(w, await asyncio.wait_for(w.handle.ping.remote(), self.task_timeout_s))
                self.ping_ms.append((time.perf_counter() - t0) * 1e3)

    def _spawn(self) -> _Actor:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        worker_id = next(self._ids)
        opts = self.options
        # No Ray-level restarts or retries: a dead worker's batch is the dispatcher's to requeue, once.
        handle = self._actor_class.options(
            num_cpus=opts.num_cpus, num_gpus=opts.num_gpus, max_restarts=0, max_task_retries=0,
            max_concurrency=4, name=None,  # threaded: sentinel() blocks beside run()
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=-1),
        ).remote(worker_id, self.spec, self._artifacts, dict(self.node_tables), self.monitor_factory)
        w = _Actor(worker_id, handle, self._loop)
        self._workers[worker_id] = w
        w.watch = asyncio.ensure_future(self._watch(w))
        return w

    async def _watch(self, w: _Actor) -> None:
        """Bring ``w`` up, then wait on its sentinel: its failure is the actor's death."""
        ray = import_ray()
        try:
            # No timeout: a replacement whose node was lost waits here until the placement group has room
            # again (no request waits on it: the queue expires by deadline, and broken() answers UNAVAILABLE
            # once the pool has had no worker for place_timeout_s). start() bounds the first workers.
            msg: RayReady = await w.handle.ready.remote()
        except ray.exceptions.RayError as exc:
            self._lost(w, exc)
            return
        self._on_ready(w, msg)
        try:
            await w.handle.sentinel.remote()
        except ray.exceptions.RayError as exc:
            self._lost(w, exc)

    def _on_ready(self, w: _Actor, msg: RayReady) -> None:
        ready = msg.ready
        self.take_models(ready)
        self._start_failures = 0
        new_node = msg.node not in self.node_tables
        self.node_tables.setdefault(msg.node, dict(ready.kernel_table))
        self.device, self.niceness, self.gpu_uuid = ready.device, ready.niceness, ready.gpu_uuid
        w.node, w.pid = msg.node, ready.pid
        log.info(READY_LOG + " on node %s", w.worker_id, ready.pid, ready.device, ready.niceness,
                 ",".join(map(str, ready.cpus)), ready.kernel_table, msg.node[:12])
        neighbours = [o for o in self._workers.values() if o is not w and o.alive and o.node == msg.node and o.pid]
        if neighbours:  # slonn's own workers on a node are not each other's contention
            w.handle.add_own_pids.remote([o.pid for o in neighbours])
            for o in neighbours:
                o.handle.add_own_pids.remote([w.pid])
        if not w.ready.done():
            w.ready.set_result(msg)
        self._empty_since = None
        self._idle.append(w)
        self.nodes_version += 1
        if new_node and self.on_node is not None:
            self.on_node(msg.node)
        self._notify_idle()

    async def _refresh_contention(self) -> None:
        """Ask idle workers for their node's contention now and then: a worker left idle (because its node
        read as busy) would otherwise keep its last batch's reading for good."""
        ray = import_ray()
        while True:
            await asyncio.sleep(REFRESH_S)
            for w in list(self._idle):
                try:
                    self._reported(w, await asyncio.wait_for(w.handle.ping.remote(), REFRESH_S))
                except (ray.exceptions.RayError, asyncio.TimeoutError):
                    pass  # a dead worker is the sentinel's to report

    def _notify_idle(self) -> None:
        if self.on_idle is not None:
            self.on_idle()

    # -- deaths ----------------------------------------------------------------

    def _lost(self, w: _Actor, reason: object) -> None:
        """``w`` died (or is given up on): forget it, kill what is left of it, start a replacement."""
        if not w.alive:
            return
        w.alive = False
        self._workers.pop(w.worker_id, None)
        self.nodes_version += 1
        if w in self._idle:
            self._idle.remove(w)
        try:
            import_ray().kill(w.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        if self._closing:
            return
        log.warning("ray worker %d (node %s) lost: %s; starting a replacement", w.worker_id, w.node[:12] or "?",
                    str(reason).splitlines()[0] if str(reason) else type(reason).__name__)
        if not w.ready.done():
            self._start_failures += 1
            w.ready.set_exception(WorkerDied(f"ray worker {w.worker_id} died while starting: {reason}"))
            w.ready.exception()  # retrieved: a start-up death is reported by start()'s gather or not at all
        self.restarts += 1
        if self._start_failures >= self.max_start_failures:
            log.error("%d ray workers in a row died while starting; not starting more", self._start_failures)
            self._gave_up = True
        else:
            self._spawn()
        self._check_empty()

    def _check_empty(self) -> None:
        """With no live worker: after place_timeout_s the pool reads as broken (UNAVAILABLE), and says so."""
        if any(w.alive and w.ready.done() for w in self._workers.values()):
            return
        if self._empty_since is None:
            self._empty_since = self._loop.time()
        if self._empty_timer is None:
            def fire() -> None:
                self._empty_timer = None
                if self.broken():
                    log.error("no ray worker for %.0f s: answering UNAVAILABLE until one starts",
                              self.options.place_timeout_s)
                    self._notify_idle()
                elif self._empty_since is not None:
                    self._check_empty()
            left_s = self._empty_since + self.options.place_timeout_s - self._loop.time()
            self._empty_timer = self._loop.call_later(max(left_s, 0.0), fire)
        if self._gave_up:
            self._notify_idle()

    def broken(self) -> bool:
        if any(w.alive and w.ready.done() for w in self._workers.values()):
            return False
        if self._gave_up or self._closing:
            return True
        return self._empty_since is not None and self._loop.time() - self._empty_since >= self.options.place_timeout_s

    # -- batches -----------------------------------------------------------------

    def idle_count(self) -> int:
        return len(self._idle)

    def _next(self, node: str | None = None) -> _Actor:
        """The idle worker the next batch goes to: the one on the least contended node (ties: longest idle);
        given a ``node``, the least contended idle one there (any other if none is)."""
        idle = [w for w in self._idle if w.node == node] if node is not None else []
        return min(idle or self._idle, key=lambda w: w.contention)

    def idle_nodes(self) -> list[str]:
        """The node of each idle worker, least contended first (the order ``submit`` hands them out)."""
        return [w.node for w in sorted(self._idle, key=lambda w: w.contention)]

    def node_workers(self) -> dict[str, int]:
        """Live, ready workers per node."""
        out: dict[str, int] = {}
        for w in self._workers.values():
            if w.alive and w.ready.done() and w.node:
                out[w.node] = out.get(w.node, 0) + 1
        return out

    def node_contention(self, node: str) -> float:
        """The contention ``node``'s workers reported last (with a result, or asked while idle)."""
        return self._node_contention.get(node, 0.0)

    def _reported(self, w: _Actor, contention: float) -> None:
        w.contention = contention
        if w.node:
            self._node_contention[w.node] = contention

    def contention(self) -> float:
        """Contention of the node the next batch will run on (with no worker idle, the most contended live
        one's): the dispatcher's contention source, so the planner predicts for the worker it will use."""
        if self._idle:
            return self._next().contention
        return max((w.contention for w in self._workers.values() if w.alive), default=0.0)

    def submit(self, task: BatchTask, node: str | None = None) -> "asyncio.Future[BatchResult]":
        """``node``: run it on an idle worker of that node (the one it was planned for), if there is one."""
        if not self._idle:
            raise RuntimeError("submit() with no idle worker")
        w = self._next(node)
        self._idle.remove(w)
        t0 = time.perf_counter()
        try:
            ref = w.handle.run.remote(task)
        except Exception as exc:  # noqa: BLE001 - e.g. the task did not serialise: the worker is fine
            self._release(w)
            failed = self._loop.create_future()
            failed.set_exception(TaskFailed(f"could not send the batch to ray worker {w.worker_id}: {exc!r}"))
            return failed
        return asyncio.ensure_future(self._await_result(w, ref, t0, task))

    async def _await_result(self, w: _Actor, ref, t0: float, task: BatchTask) -> BatchResult:
        ray = import_ray()
        try:
            msg = await asyncio.wait_for(ref, self.task_timeout_s)
        except asyncio.TimeoutError:
            log.error("ray worker %d: task %d ran over %.1f s; killing it", w.worker_id, task.task_id,
                      self.task_timeout_s)
            self._lost(w, "hung")
            raise WorkerDied(f"ray worker {w.worker_id} hung for {self.task_timeout_s} s") from None
        except ray.exceptions.RayActorError as exc:
            self._lost(w, exc)
            raise WorkerDied(f"ray worker {w.worker_id} died: {str(exc).splitlines()[0]}") from None
        except ray.exceptions.RayTaskError as exc:  # raised in run() itself, not by the model: worker is up
            self._release(w)
            raise TaskFailed(f"ray worker {w.worker_id}: {str(exc).splitlines()[0]}") from None
        except ray.exceptions.RayError as exc:  # the result is lost with its node, or Ray cannot reach it
            self._lost(w, exc)
            raise WorkerDied(f"ray worker {w.worker_id}: {type(exc).__name__}") from None
        if isinstance(msg, WorkerFailure):
            self._release(w)
            raise TaskFailed(msg.error)
        self.call_overhead_ms.append((time.perf_counter() - t0) * 1e3 - msg.exec_ms)
        if msg.contention is not None:
            self._reported(w, msg.contention)
        w.batches += 1
        self._release(w)
        return msg

    def _release(self, w: _Actor) -> None:
        if w.alive:
            self._idle.append(w)

    # -- observation ----------------------------------------------------------------

    def actors(self) -> list:
        """Handles of the live, ready workers (for monitoring and fault-injection tests)."""
        return [w.handle for w in self._workers.values() if w.alive and w.ready.done()]

    def nodes(self) -> dict[str, dict]:
        """Per node: live workers, batches they ran, latest contention (tests, stats)."""
        out: dict[str, dict] = {}
        for w in self._workers.values():
            if w.alive and w.node:
                d = out.setdefault(w.node, {"workers": 0, "batches": 0, "contention": 0.0})
                d["workers"] += 1
                d["batches"] += w.batches
                d["contention"] = max(d["contention"], w.contention)
        return out

    def home_node(self) -> str:
        """The node this process (the frontend) runs on: a profile taken here describes its workers."""
        return import_ray().get_runtime_context().get_node_id()

    def overhead_floor_ms(self) -> float:
        """The median round trip of an empty Ray call measured at start (0 before start)."""
        return float(np.median(self.ping_ms)) if self.ping_ms else 0.0

    # -- close --------------------------------------------------------------------------

    async def close(self) -> None:
        self._closing = True
        if self._empty_timer is not None:
            self._empty_timer.cancel()
        if self._refresher is not None:
            self._refresher.cancel()
        ray = import_ray()
        for w in list(self._workers.values()):
            if w.watch is not None:
                w.watch.cancel()
            w.alive = False
            try:
                ray.kill(w.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._workers.clear()
        self._idle.clear()
        if getattr(self, "_pg", None) is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001 - the cluster went away first
                pass
        if self._own_ray:
            ray.shutdown()
