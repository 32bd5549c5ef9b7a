"""The asyncio side of scheduling: admit requests, run the driver's batches on the pool, answer futures.

One event loop owns everything here. The decisions come from
``scheduler.driver.Driver`` (pure, shared with the simulator); this module
only does I/O and time: futures, the pool, metrics, logging, the clock.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from slonn.policy.latency_model import LatencySample
from slonn.policy.planner import PlanContext
from slonn.scheduler.clock import Clock
from slonn.scheduler.core import Batch, Scheduler
from slonn.scheduler.driver import FRONTEND_BATCH_MS, FRONTEND_REQUEST_MS, Driver
from slonn.scheduler.errors import DeadlineUnreachable, InvalidArgument, QueueFull, RequestError, Unavailable
from slonn.scheduler.latency import LatencySource
from slonn.scheduler.metrics import UNKNOWN, ServerMetrics
from slonn.scheduler.queues import QueuedRequest
from slonn.workers.pool import TaskFailed, WorkerDied, WorkerPool
from slonn.workers.protocol import BatchTask

log = logging.getLogger(__name__)

INTERNAL_ERROR = "internal scheduler error; see the server log"
"""What requests are answered (INTERNAL) when the scheduler itself raised."""


@dataclass(frozen=True)
class Completion:
    """What one request gets back."""

    output: np.ndarray
    level: float
    expected_accuracy: float
    queue_ms: float
    exec_ms: float
    predicted_ms: float
    batch_size: int
    late: bool
    kernel: str


class Dispatcher:
    """Admits requests through the driver and runs its batches on the pool."""

    def __init__(self, scheduler: Scheduler, pool: WorkerPool, clock: Clock, latency: LatencySource,
                 accuracy: dict[str, tuple[float, ...]], max_batch: int, overhead_ms: float = 1.0,
                 max_inflight: int = 8192, contention: Callable[[], float] = lambda: 0.0,
                 on_batch: Callable[[Batch, float, float], None] | None = None, workers: int = 1,
                 metrics: ServerMetrics | None = None,
                 frontend_cpu: Callable[[], float] | None = None) -> None:
        self.scheduler = scheduler
        self.pool = pool
        self.clock = clock
        self.latency = latency
        self.accuracy = accuracy
        self.contention = contention
        self.per_node = pool.per_node
        """The pool's workers run on several nodes: each batch is planned for its worker's node (its table,
        contention and overhead allowance) and runs there."""
        self.driver = Driver(scheduler, latency.table, accuracy, max_batch, overhead_ms, workers, max_inflight,
                             contention=lambda _now: contention(), start_s=clock.now(),
                             frontend_cpu=None if frontend_cpu is None else lambda _now: frontend_cpu(),
                             frontend_batch_ms=FRONTEND_BATCH_MS, frontend_request_ms=FRONTEND_REQUEST_MS,
                             node_tables=latency.table if self.per_node else None,
                             node_contention=(lambda node, _now: pool.node_contention(node)) if self.per_node else None)
        """The decisions: admission, batches per idle worker, expiry, the overhead allowance, the frontend's cost
        (``frontend_cpu()``: the event-loop thread's CPU seconds, read every few tens of ms; None: not measured)."""
        self._nodes_version = -1
        self.on_batch = on_batch
        """Called after each batch with (batch, exec_ms, contention): metrics, logs."""
        self.metrics = metrics or ServerMetrics()
        self.running: set[asyncio.Future] = set()
        self.wake_at_s: float | None = None
        """When the loop looks again even if nothing happens (the driver's last word), or None."""
        self._accepting = True
        self._wakeup = asyncio.Event()
        pool.on_idle = self.wake  # a replacement worker came up: queued requests can run
        self._task_ids = itertools.count()
        self._loop_task: asyncio.Task | None = None

    @property
    def inflight(self) -> int:
        """Admitted requests not answered yet."""
        return self.driver.inflight

    @property
    def max_inflight(self) -> int:
        """Admitted, unanswered requests beyond this are refused RESOURCE_EXHAUSTED."""
        return self.driver.max_inflight

    @property
    def overhead_ms(self) -> float:
        """The overhead allowance the planner adds to every predicted exec time (learned; see Driver)."""
        return self.driver.overhead_ms

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="slonn-dispatcher")

    def wake(self) -> None:
        """Decide again now (a worker came up; a test moved its fake clock)."""
        self._wakeup.set()

    async def drain(self, grace_s: float) -> int:
        """Stop admitting, let queued and running work finish for up to ``grace_s``; answer the rest UNAVAILABLE.

        Returns how many requests were answered UNAVAILABLE.
        """
        self._accepting = False
        deadline = self.clock.now() + grace_s
        while (self.scheduler.pending() or self.running) and self.clock.now() < deadline:
            self._wakeup.set()
            await asyncio.sleep(0.01)
        left = self.driver.stop()
        for req in left:
            self._fail(req, Unavailable("server is shutting down; request was not run"))
        if self._loop_task:
            self._loop_task.cancel()
        return len(left)

    @property
    def accepting(self) -> bool:
        """Admitting requests (False once drain() has begun)."""
        return self._accepting

    # -- admission ----------------------------------------------------------

    def contexts(self) -> dict[str, PlanContext]:
        """What the policy plans with now, per model."""
        return self.driver.contexts(self.clock.now())

    async def infer(self, model: str, slo_class: str, inputs: np.ndarray, budget_ms: float | None = None,
                    hard: bool = False) -> Completion:
        """Admit one request and wait for its answer; raises RequestError subclasses.

        ``hard``: ``budget_ms`` is the caller's own deadline (see :meth:`Scheduler.make_request`).
        """
        now = self.clock.now()
        future = asyncio.get_running_loop().create_future()
        req = self._admit(model, slo_class, inputs, budget_ms, hard, now, future)
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            self.driver.cancel(req)  # the caller left
            raise
        finally:
            self.driver.release()

    async def infer_many(self, model: str, slo_class: str, samples: np.ndarray, budget_ms: float | None = None,
                         hard: bool = False, field: str = "input") -> list[Completion]:
        """Admit the N rows of ``samples`` ([N, features]) as N requests with one arrival time and one
        deadline; one awaitable for the N answers, in input order.

        Admission is all or nothing: N beyond the class's ``max_queue`` for this model could never be admitted
        (InvalidArgument naming ``field``, the request's input, and the limit); a full queue, the in-flight cap
        or an unreachable deadline refuses all N, counted N times. The N answer as one: when any sample fails
        later, the others leave the queues (those already in a batch still run, their answers unread) and that
        failure is raised.
        """
        n = len(samples)
        limit = self.scheduler.queue_limit(model, slo_class)
        if limit is not None and n > limit:
            bad = InvalidArgument(f"{field}: {n} samples, more than slo_class {slo_class!r} queues for model "
                                  f"{model!r} (max_queue={limit}); send at most {limit} per request")
            self._count(model, slo_class, bad, n)
            raise bad
        if n and self.inflight + n > self.max_inflight:
            full = QueueFull(f"server has {self.inflight} requests in flight and this one carries {n} samples "
                             f"(max_inflight={self.max_inflight})")
            self._count(model, slo_class, full, n)
            raise full
        now = self.clock.now()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(n)]
        reqs: list[QueuedRequest] = []
        try:
            for row, future in zip(samples, futures):
                reqs.append(self._admit(model, slo_class, row, budget_ms, hard, now, future, count=False))
        except RequestError as exc:
            for req in reqs:  # admitted siblings: out of the queues, answered with the call's error
                self.driver.cancel(req)
            self.driver.release(len(reqs))
            self._count(model, slo_class, exc, n)  # the whole call is refused: every sample
            raise
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*futures))
        except BaseException as exc:
            # A failed sample, or the caller left (gather has then cancelled every handle already).
            for req in reqs:
                self.driver.cancel(req)  # a no-op for those in a batch or answered
                if not req.handle.done():
                    req.handle.cancel()
                    if isinstance(exc, RequestError):
                        self._count(req.model, req.slo_class, exc, 1)
            raise
        finally:
            self.driver.release(n)

    def _admit(self, model: str, slo_class: str, inputs: np.ndarray, budget_ms: float | None, hard: bool,
               now: float, future: asyncio.Future, count: bool = True) -> QueuedRequest:
        """Queue one request answered through ``future``, or raise (counted in the metrics if ``count``)."""
        try:
            if not self._accepting:
                raise Unavailable("server is shutting down; not admitting requests")
            if self.pool.broken():
                raise Unavailable("no worker is running and none could be started; see the server log")
            # the in-flight cap, the queue's limit, the deadline: the driver's
            return self.driver.admit(model, slo_class, now, inputs, future, budget_ms, hard)
        except RequestError as exc:
            if count:
                self._count(model, slo_class, exc, 1)
            raise

    def _count(self, model: str, slo_class: str, exc: RequestError, n: int) -> None:
        """Count ``n`` requests answered with ``exc``; the frontends count only errors not counted here."""
        exc.counted = True
        # Names a client made up are not label values: one series each would grow without bound.
        model = model if model in self.accuracy else UNKNOWN
        slo_class = slo_class if slo_class in self.scheduler.classes else UNKNOWN
        self.metrics.reject(model, slo_class, exc.kind.value, n)

    # -- the loop -----------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                self.wake_at_s = self._dispatch()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad decision
                log.exception("dispatch failed; failing the queued requests")
                for req in self.driver.drain():
                    self._fail(req, RequestError(INTERNAL_ERROR))
                self.wake_at_s = None
            timeout = None if self.wake_at_s is None else max(0.0, self.wake_at_s - self.clock.now())
            try:
                async with asyncio.timeout(timeout):  # not wait_for: no task per turn of the loop
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._wakeup.clear()

    def _dispatch(self) -> float | None:
        """Run the driver's batch per idle worker; returns when to look again even if nothing happens."""
        idle = self.pool.idle_count()
        if idle == 0 and self.pool.broken():
            for req in self.driver.drain():
                self._fail(req, Unavailable("no worker is running and none could be started"))
            return None
        # A worker coming back (or the pool breaking) wakes the loop through pool.on_idle.
        now = self.clock.now()
        if self.per_node:
            pool = self.pool
            if self._nodes_version != pool.nodes_version:
                self._nodes_version = pool.nodes_version
                self.driver.set_nodes(pool.node_workers())
            nodes = pool.idle_nodes()
            out = self.driver.next_batches(len(nodes), now, nodes)
        else:
            out = self.driver.next_batches(idle, now)
        self._expire(out.expired, now)
        for i, batch in enumerate(out.batches):
            try:
                self._launch(batch, self.pool.node_contention(batch.node) if self.per_node else self.contention())
            except Exception:  # out of the queues and not yet running: answer them here, then the loop drains
                for unlaunched in out.batches[i:]:
                    for req in unlaunched.requests:
                        self._fail(req, RequestError(INTERNAL_ERROR))
                raise
        return out.wake_at_s

    def _expire(self, expired: list[QueuedRequest], now: float) -> None:
        for req in expired:
            self._fail(req, DeadlineUnreachable(
                f"deadline cannot be met: {(now - req.pending.arrival_s) * 1e3:.1f} ms queued, "
                f"{(req.pending.deadline_s - now) * 1e3:.1f} ms left"))

    def _launch(self, batch: Batch, contention: float) -> None:
        if log.isEnabledFor(logging.DEBUG):  # why this batch (the simulator's batches are not logged)
            plan = batch.plan
            log.debug("plan %s: %d of %d candidates at level %g, predicted %.2f ms (recent slowdown factor %.2f), "
                      "slack %.2f ms (%s)", batch.model, plan.count, plan.candidates, plan.level, plan.predicted_ms,
                      plan.speed, plan.slack_ms, plan.reason)
        inputs = np.stack([r.inputs for r in batch.requests])
        task = BatchTask(next(self._task_ids), batch.model, batch.plan.level, inputs)
        future = self.pool.submit(task, batch.node) if self.per_node else self.pool.submit(task)  # type: ignore[call-arg]
        self.running.add(future)
        future.add_done_callback(lambda f: self._finish(batch, f, contention))

    def _finish(self, batch: Batch, future: asyncio.Future, contention: float) -> None:
        self.running.discard(future)
        self._wakeup.set()
        if future.cancelled():
            error: RequestError | None = Unavailable("batch was cancelled (shutdown)")
        else:
            exc = future.exception()
            error = None
            if isinstance(exc, WorkerDied):
                self._retry(batch, exc)
                return
            elif isinstance(exc, TaskFailed):
                error = RequestError(f"model failed: {exc}")
            elif exc is not None:
                error = RequestError(f"internal error: {type(exc).__name__}: {exc}")
        if error is not None:
            for req in batch.requests:
                self._fail(req, error)
            return
        result = future.result()
        now = self.clock.now()
        if len(result.outputs) != len(batch.requests):
            for req in batch.requests:
                self._fail(req, RequestError(f"worker returned {len(result.outputs)} outputs for "
                                             f"{len(batch.requests)} requests"))
            return
        self._complete(batch, result.outputs, result.exec_ms, result.kernel, now)
        self.driver.on_batch_done(batch, result.exec_ms, now)
        m = self.metrics
        level = f"{batch.plan.level:g}"
        m.batches.labels(batch.model, level).inc()
        m.batch_size.labels(batch.model).observe(len(batch.requests))
        m.exec_ms.labels(batch.model, level).observe(result.exec_ms)
        m.contention.set(contention)
        if result.exec_ms > batch.plan.predicted_ms:
            m.under_predicted.labels(batch.model).inc()
        # Where it ran (a Ray pool may have had to use another node than planned): that node's learner.
        self.latency.observe(batch.model, LatencySample(batch.plan.level, len(batch.requests), contention,
                                                        result.exec_ms, result.kernel), result.node)
        if self.per_node:
            m.node_batches.labels(result.node).inc()
            table = self.latency.table(batch.model, result.node)
            m.node_table_ms.labels(batch.model, result.node).set(
                table.mean(0, table.fastest_index(0, self.accuracy[batch.model], 0.0), table.max_batch))
        if self.on_batch:
            self.on_batch(batch, result.exec_ms, contention)

    def _retry(self, batch: Batch, exc: WorkerDied) -> None:
        """The batch's worker died: the driver queues its requests again, by deadline, for one more run
        (:meth:`Driver.on_worker_died`); a second death, or one during shutdown, answers UNAVAILABLE."""
        live = [r for r in batch.requests if not r.handle.done()]
        requeued, failed = self.driver.on_worker_died(live)
        if self.driver.stopped:  # shutting down (e.g. close() killed a worker that outran the grace period)
            for req in failed:
                self._fail(req, Unavailable(f"server is shutting down; worker failed: {exc}"))
            return
        self.metrics.worker_deaths.labels(batch.model).inc()
        for req in requeued:
            self.metrics.retried.labels(req.model, req.slo_class).inc()
        log.warning("batch of %d (%s, level %g): %s; %d request(s) queued again, %d failed twice",
                    len(batch.requests), batch.model, batch.plan.level, exc, len(requeued), len(failed))
        for req in failed:
            self._fail(req, Unavailable(f"worker failed twice under this request: {exc}"))

    def _complete(self, batch: Batch, outputs: np.ndarray, exec_ms: float, kernel: str, now: float) -> None:
        plan = batch.plan
        levels = self.latency.table(batch.model).levels
        accuracy = self.accuracy[batch.model][levels.index(plan.level)]
        queue_ms = self.metrics.queue_ms
        for req, out in zip(batch.requests, outputs):
            if req.handle.done():
                continue  # the caller already left
            missed = self.driver.missed(req, now)
            if missed is not None:  # finished after a deadline that must not be served late
                self._fail(req, missed)
                continue
            late = now > req.pending.deadline_s
            self.metrics.served(req.model, req.slo_class, late, (now - req.pending.arrival_s) * 1e3, plan.level)
            queue_ms.labels(req.slo_class).observe((batch.planned_at_s - req.pending.arrival_s) * 1e3)
            req.handle.set_result(Completion(
                output=out, level=plan.level, expected_accuracy=accuracy,
                queue_ms=(batch.planned_at_s - req.pending.arrival_s) * 1e3, exec_ms=exec_ms,
                predicted_ms=plan.predicted_ms, batch_size=len(batch.requests),
                late=late, kernel=kernel))

    def _fail(self, req: QueuedRequest, error: RequestError) -> None:
        if not req.handle.done():
            self._count(req.model, req.slo_class, error, 1)
            req.handle.set_exception(error)
