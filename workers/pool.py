"""Worker pools: one interface, a spawned-process implementation and an in-process twin.

The pool runs one BatchTask per worker at a time. A worker that dies
mid-batch (crash, SIGKILL, OOM) is noticed at once through its process
sentinel and replaced; the batch's future raises :class:`WorkerDied`, and the
dispatcher queues its requests again (retry once, by deadline: see
``Scheduler.retry``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Callable
from dataclasses import replace

from slonn.workers.artifact import ModelManifest
from slonn.workers.device import gpu_uuid
from slonn.workers.process import WorkerSpec, execute, load_runners, warm_up, worker_main
from slonn.workers.protocol import BatchResult, BatchTask, Shutdown, WorkerFailure, WorkerReady

log = logging.getLogger(__name__)

READY_LOG = "worker %d ready (pid %d, %s, niceness %d, cpus %s); kernels %s"
"""The line logged when a worker is up: id, pid, device, niceness, CPUs, kernel table (``python -m bench.adapt`` reads
the niceness and CPUs back from the server's log)."""


class WorkerDied(Exception):
    """The batch's worker died (or hung past the task timeout and was killed)."""


class TaskFailed(Exception):
    """The model raised while running the batch (the worker is fine)."""


class WorkerPool(ABC):
    """Runs batches on workers; ``start`` before use, ``close`` after."""

    manifests: dict[str, ModelManifest]
    device: str = "cpu"
    niceness: int | None = None
    """The niceness the workers reported when they came up (None: they run in, or inherit, this process's)."""
    gpu_uuid: str = ""
    """NVML's name of the workers' GPU ("" on the CPU), once started."""
    on_idle: Callable[[], None] | None = None
    """Called when a worker becomes idle other than by a batch's future finishing (a replacement is
    ready) or when the pool breaks: whoever dispatches should look again."""
    per_node = False
    """Workers run on several nodes that may differ (RayPool): batches are planned for the node of the worker
    they will run on (``idle_nodes``, ``node_workers``, ``node_contention``, ``submit(task, node)``)."""
    nodes_version = 0
    """Changes whenever ``node_workers()`` may have changed (per-node pools)."""

    def idle_nodes(self) -> list[str]:
        """The node of each idle worker, in the order the pool would hand them out ("": this machine)."""
        return [""] * self.idle_count()

    def node_workers(self) -> dict[str, int]:
        """Live workers per node."""
        return {}

    def node_contention(self, node: str) -> float:
        """The latest contention reported from ``node`` (per-node pools)."""
        return 0.0

    def home_node(self) -> str:
        """The node this process runs on (per-node pools)."""
        return ""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    def idle_count(self) -> int:
        """Workers ready for a batch right now."""

    @abstractmethod
    def submit(self, task: BatchTask) -> "asyncio.Future[BatchResult]":
        """Start ``task`` on an idle worker now (``idle_count() > 0`` is required).

        The idle worker is taken before this returns, so a caller can submit
        once per idle worker without awaiting. The future raises TaskFailed
        or WorkerDied.
        """

    failed: dict[str, str]
    """model name -> why the workers could not load it: not served (the other models are)."""

    def broken(self) -> bool:
        """No worker is left and none can be started: nothing queued will ever run."""
        return False

    def take_models(self, ready: WorkerReady) -> None:
        """A worker is up with ``ready``'s models: a model any worker failed to load stays unserved (a batch
        of it could reach a worker without it)."""
        self.failed.update(ready.failed)
        self.manifests = {n: ModelManifest.from_json(m) for n, m in ready.models.items() if n not in self.failed}

    @abstractmethod
    async def close(self) -> None: ...


class InProcessPool(WorkerPool):
    """Runs the model in this process on a thread (tests, debugging). Same contract, no IPC."""

    def __init__(self, spec: WorkerSpec, workers: int = 1) -> None:
        self.spec = spec
        self.workers = workers
        self._busy = 0
        self._executor: ThreadPoolExecutor | None = None
        self.manifests = {}
        self.failed = {}

    async def start(self) -> None:
        self._runners = await asyncio.to_thread(load_runners, self.spec, self.failed)
        await asyncio.to_thread(warm_up, self._runners)
        self.manifests = {n: r.manifest for n, r in self._runners.items()}
        device = next(iter(self._runners.values())).device
        self.device, self.gpu_uuid = str(device), gpu_uuid(device)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="slonn-inproc")

    def idle_count(self) -> int:
        return self.workers - self._busy

    def submit(self, task: BatchTask) -> "asyncio.Future[BatchResult]":
        if self._busy >= self.workers:
            raise RuntimeError("submit() with no idle worker")
        self._busy += 1
        return asyncio.ensure_future(self._run(task))

    async def _run(self, task: BatchTask) -> BatchResult:
        try:
            msg = await asyncio.get_running_loop().run_in_executor(self._executor, execute, self._runners, task, 0)
        finally:
            self._busy -= 1
        if isinstance(msg, WorkerFailure):
            raise TaskFailed(msg.error)
        return msg

    async def close(self) -> None:
        if self._executor:
            self._executor.shutdown(wait=True)


class _Worker:
    __slots__ = ("worker_id", "process", "conn", "ready", "future", "alive")

    def __init__(self, worker_id: int, process, conn, loop: asyncio.AbstractEventLoop) -> None:
        self.worker_id = worker_id
        self.process = process
        self.conn = conn
        self.ready: asyncio.Future = loop.create_future()
        self.future: asyncio.Future | None = None
        self.alive = True


class ProcessPool(WorkerPool):
    """Spawned worker processes, restarted when they die."""

    def __init__(self, spec: WorkerSpec, workers: int = 1, start_timeout_s: float = 300.0,
                 task_timeout_s: float = 30.0, on_spawn: Callable[[int], None] | None = None) -> None:
        self.spec = spec
        self.on_spawn = on_spawn
        """Called with each new worker's pid (e.g. so the contention monitor does not count it)."""
        self.n_workers = workers
        self.start_timeout_s = start_timeout_s
        self.task_timeout_s = task_timeout_s
        """A batch running longer than this is taken as a hung worker: it is killed and replaced."""
        self.manifests = {}
        self.failed = {}
        self.restarts = 0
        self._ctx = mp.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._idle: list[_Worker] = []
        self._closing = False
        self._ids = itertools.count()
        self.max_start_failures = 5
        """Consecutive workers dying before they are ready, after which the pool stops respawning."""
        self._start_failures = 0
        self._broken = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        workers = [self._spawn() for _ in range(self.n_workers)]
        await asyncio.wait_for(asyncio.gather(*(w.ready for w in workers)), self.start_timeout_s)

    def _spawn(self) -> _Worker:
        worker_id = next(self._ids)
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=worker_main, args=(worker_id, self.spec, child), daemon=True,
                                    name=f"slonn-worker-{worker_id}")
        process.start()
        child.close()  # so that the worker's death reads as EOF here
        if self.on_spawn is not None:
            self.on_spawn(process.pid)
        w = _Worker(worker_id, process, parent, self._loop)
        self._workers[worker_id] = w
        self._loop.add_reader(parent.fileno(), self._on_readable, w)
        self._loop.add_reader(process.sentinel, self._on_exit, w)
        return w

    def _on_readable(self, w: _Worker) -> None:
        try:
            while w.alive and w.conn.poll():
                msg = w.conn.recv()
                if isinstance(msg, WorkerReady):
                    self._on_ready(w, msg)
                elif w.future is not None and not w.future.done():
                    w.future.set_result(msg)
        except (EOFError, OSError):
            self._on_exit(w)

    def _on_ready(self, w: _Worker, msg: WorkerReady) -> None:
        self.take_models(msg)
        self._start_failures = 0
        if not self.spec.kernel_tables and msg.kernel_table:
            # Replacements reuse this measurement: a restart should not pay for calibration again.
            self.spec = replace(self.spec, kernel_tables=dict(msg.kernel_table))
        self.device = msg.device
        self.niceness = msg.niceness
        self.gpu_uuid = msg.gpu_uuid
        log.info(READY_LOG, w.worker_id, msg.pid, msg.device, msg.niceness, ",".join(map(str, msg.cpus)),
                 msg.kernel_table)
        if not w.ready.done():
            w.ready.set_result(msg)
        self._release(w)
        self._notify_idle()

    def _notify_idle(self) -> None:
        if self.on_idle is not None:
            self.on_idle()

    def _on_exit(self, w: _Worker) -> None:
        if not w.alive:
            return
        w.alive = False
        for fd in (w.conn.fileno(), w.process.sentinel):
            self._loop.remove_reader(fd)
        w.conn.close()
        self._workers.pop(w.worker_id, None)
        if w in self._idle:
            self._idle.remove(w)
        if self._closing:
            return
        log.warning("worker %d (pid %s) died with exit code %s; starting a replacement",
                    w.worker_id, w.process.pid, w.process.exitcode)
        if w.future is not None and not w.future.done():
            w.future.set_exception(WorkerDied(f"worker {w.worker_id} died (exit code {w.process.exitcode})"))
        if not w.ready.done():
            self._start_failures += 1
            w.ready.set_exception(WorkerDied(f"worker {w.worker_id} died while starting"))
            w.ready.exception()  # retrieved: a start-up death is reported by start()'s gather or not at all
        self.restarts += 1
        if self._start_failures >= self.max_start_failures:
            # A worker that cannot even start (bad artifact, OOM at load) would be respawned forever.
            log.error("%d workers in a row died while starting; not starting more", self._start_failures)
            self._broken = True
            self._notify_idle()
            return
        self._spawn()

    def _release(self, w: _Worker) -> None:
        w.future = None
        if w.alive:
            self._idle.append(w)

    def idle_count(self) -> int:
        return len(self._idle)

    def pids(self) -> list[int]:
        """Process ids of the live workers (for monitoring and fault-injection tests)."""
        return [w.process.pid for w in self._workers.values() if w.alive]

    def broken(self) -> bool:
        return self._broken and not self._workers

    def submit(self, task: BatchTask) -> "asyncio.Future[BatchResult]":
        if not self._idle:
            raise RuntimeError("submit() with no idle worker")
        return self._send(self._idle.pop(), task)

    def _send(self, w: _Worker, task: BatchTask) -> "asyncio.Future[BatchResult]":
        w.future = self._loop.create_future()
        try:
            w.conn.send(task)
        except OSError as exc:  # the pipe is gone: the worker is dying (_on_exit replaces it)
            w.future = None
            failed = self._loop.create_future()
            failed.set_exception(WorkerDied(f"worker {w.worker_id}: {exc}"))
            return failed
        except Exception as exc:  # noqa: BLE001 - e.g. the task did not pickle: the worker is fine
            self._release(w)
            failed = self._loop.create_future()
            failed.set_exception(TaskFailed(f"could not send the batch to worker {w.worker_id}: {exc!r}"))
            return failed
        return asyncio.ensure_future(self._await_result(w, task))

    async def _await_result(self, w: _Worker, task: BatchTask) -> BatchResult:
        try:
            msg = await asyncio.wait_for(asyncio.shield(w.future), self.task_timeout_s)
        except asyncio.TimeoutError:
            log.error("worker %d: task %d ran over %.1f s; killing it", w.worker_id, task.task_id,
                      self.task_timeout_s)
            w.future = None  # its death is this timeout, reported here
            w.process.kill()
            raise WorkerDied(f"worker {w.worker_id} hung for {self.task_timeout_s} s") from None
        self._release(w)
        if isinstance(msg, WorkerFailure):
            raise TaskFailed(msg.error)
        return msg

    async def close(self) -> None:
        self._closing = True
        for w in list(self._workers.values()):
            try:
                w.conn.send(Shutdown())
            except OSError:
                pass
        for w in list(self._workers.values()):
            await asyncio.to_thread(w.process.join, 5.0)
            if w.process.is_alive():
                w.process.kill()
                await asyncio.to_thread(w.process.join, 5.0)
            if w.alive:
                w.alive = False
                for fd in (w.conn.fileno(), w.process.sentinel):
                    self._loop.remove_reader(fd)
                w.conn.close()
        self._workers.clear()
        self._idle.clear()
