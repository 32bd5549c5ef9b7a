"""The asyncio side of scheduling: admit requests, run the Scheduler when a worker is free, answer futures.

One event loop owns everything here. The decisions come from
``scheduler.core.Scheduler`` (pure); this module only does I/O and time.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from slonn.policy.latency_model import LatencySample
from slonn.policy.planner import PlanContext
from slonn.scheduler.clock import Clock
from slonn.scheduler.core import Batch, Scheduler
from slonn.scheduler.errors import (
    DeadlineUnreachable,
    QueueFull,
    RequestError,
    Unavailable,
)
from slonn.scheduler.latency import LatencySource
from slonn.scheduler.metrics import UNKNOWN, ServerMetrics
from slonn.scheduler.queues import QueuedRequest
from slonn.workers.pool import TaskFailed, WorkerDied, WorkerPool
from slonn.workers.protocol import BatchTask

log = logging.getLogger(__name__)

OVERHEAD_WINDOW = 256
"""Recent batches whose overhead (done - planned - exec) sets the planner's overhead allowance."""
OVERHEAD_STALE_S = 1.0
"""Without a finished batch for this long, a raised overhead allowance is halved (see _forget_stale_overhead)."""
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
    """Admits requests into the Scheduler and runs its batches on the pool."""

    def __init__(self, scheduler: Scheduler, pool: WorkerPool, clock: Clock, latency: LatencySource,
                 accuracy: dict[str, tuple[float, ...]], max_batch: int, overhead_ms: float = 1.0,
                 max_inflight: int = 8192, contention: Callable[[], float] = lambda: 0.0,
                 on_batch: Callable[[Batch, float, float], None] | None = None, workers: int = 1,
                 metrics: ServerMetrics | None = None) -> None:
        self.scheduler = scheduler
        self.pool = pool
        self.clock = clock
        self.latency = latency
        self.accuracy = accuracy
        self.max_batch = max_batch
        self.min_overhead_ms = overhead_ms
        """Floor of the per-batch overhead the planner adds to predicted exec time."""
        self.overhead_ms = overhead_ms
        """Current overhead: the 95th percentile of measured (batch done - planned - exec), at least the floor."""
        self._overheads: collections.deque[float] = collections.deque(maxlen=OVERHEAD_WINDOW)
        self._batches_done = 0
        self._last_batch_s = clock.now()
        self._refused_since_batch = False
        """Admission refused a request as out of reach since the last finished batch."""
        self.max_inflight = max_inflight
        self.contention = contention
        self.on_batch = on_batch
        """Called after each batch with (batch, exec_ms, contention): metrics, logs."""
        self.workers = workers
        self.metrics = metrics or ServerMetrics()
        self.inflight = 0
        self.running: set[asyncio.Future] = set()
        self._accepting = True
        self._drained = False
        """drain() has answered everything queued: nothing will be dispatched any more."""
        self._wakeup = asyncio.Event()
        pool.on_idle = self._wakeup.set  # a replacement worker came up: queued requests can run
        self._task_ids = itertools.count()
        self._loop_task: asyncio.Task | None = None

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="slonn-dispatcher")

    async def drain(self, grace_s: float) -> int:
        """Stop admitting, let queued and running work finish for up to ``grace_s``; answer the rest UNAVAILABLE.

        Returns how many requests were answered UNAVAILABLE.
        """
        self._accepting = False
        deadline = self.clock.now() + grace_s
        while (self.scheduler.pending() or self.running) and self.clock.now() < deadline:
            self._wakeup.set()
            await asyncio.sleep(0.01)
        left = self.scheduler.drain()
        for req in left:
            self._fail(req, Unavailable("server is shutting down; request was not run"))
        self._drained = True
        if self._loop_task:
            self._loop_task.cancel()
        return len(left)

    @property
    def accepting(self) -> bool:
        """Admitting requests (False once drain() has begun)."""
        return self._accepting

    # -- admission ----------------------------------------------------------

    def contexts(self) -> dict[str, PlanContext]:
        self._forget_stale_overhead()
        contention = self.contention()
        out = {}
        for model, acc in self.accuracy.items():
            table = self.latency.table(model)
            out[model] = PlanContext(table, table.bucket(contention), acc, self.max_batch, self.overhead_ms,
                                     workers=self.workers)
        return out

    async def infer(self, model: str, slo_class: str, inputs: np.ndarray, budget_ms: float | None = None,
                    hard: bool = False) -> Completion:
        """Admit one request and wait for its answer; raises RequestError subclasses.

        ``hard``: ``budget_ms`` is the caller's own deadline (see :meth:`Scheduler.make_request`).
        """
        now = self.clock.now()
        future = asyncio.get_running_loop().create_future()
        req = self._admit(model, slo_class, inputs, budget_ms, hard, now, future)
        self.inflight += 1
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller left: no work for callers who are gone.
            self.scheduler.cancel(req)
            raise
        finally:
            self.inflight -= 1

    async def infer_many(self, model: str, slo_class: str, samples: np.ndarray, budget_ms: float | None = None,
                         hard: bool = False) -> list[Completion]:
        """Admit the N rows of ``samples`` ([N, features]) as N requests with one arrival time and one
        deadline; one awaitable for the N answers, in input order.

        The N answer as one: when any sample fails (at admission or later), the others leave the queues
        (those already in a batch still run, their answers unread) and that failure is raised.
        """
        n = len(samples)
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
                reqs.append(self._admit(model, slo_class, row, budget_ms, hard, now, future))
        except RequestError as exc:
            for req in reqs:  # admitted siblings: out of the queues, answered with the batch's error
                self.scheduler.cancel(req)
            self._count(model, slo_class, exc, len(reqs))
            raise
        self.inflight += n
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*futures))
        except BaseException as exc:
            # A failed sample, or the caller left (gather has then cancelled every handle already).
            for req in reqs:
                self.scheduler.cancel(req)  # a no-op for those in a batch or answered
                if not req.handle.done():
                    req.handle.cancel()
                    if isinstance(exc, RequestError):
                        self._count(req.model, req.slo_class, exc, 1)
            raise
        finally:
            self.inflight -= n

    def _admit(self, model: str, slo_class: str, inputs: np.ndarray, budget_ms: float | None, hard: bool,
               now: float, future: asyncio.Future) -> QueuedRequest:
        """Queue one request answered through ``future``, or raise (counted in the metrics)."""
        if not self._accepting:
            raise self._counted(model, slo_class, Unavailable("server is shutting down; not admitting requests"))
        if self.pool.broken():
            raise self._counted(model, slo_class, Unavailable(
                "no worker is running and none could be started; see the server log"))
        if self.inflight >= self.max_inflight:
            raise self._counted(model, slo_class, QueueFull(
                f"server has {self.inflight} requests in flight (max_inflight={self.max_inflight})"))
        try:
            req = self.scheduler.make_request(model, slo_class, now, inputs, budget_ms, future, hard)
            self.scheduler.add_request(req, now, self.contexts()[model])
        except RequestError as exc:
            self._count(model, slo_class, exc, 1)
            if isinstance(exc, DeadlineUnreachable) and not self._refused_since_batch:
                self._refused_since_batch = True
                self._last_batch_s = max(self._last_batch_s, now)  # staleness counts from the first refusal
            raise
        return req

    def _counted(self, model: str, slo_class: str, exc: RequestError) -> RequestError:
        self._count(model, slo_class, exc, 1)
        return exc

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
                wake_at = self._dispatch()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad decision
                log.exception("dispatch failed; failing the queued requests")
                for req in self.scheduler.drain():
                    self._fail(req, RequestError(INTERNAL_ERROR))
                wake_at = None
            timeout = None if wake_at is None else max(0.0, wake_at - self.clock.now())
            try:
                async with asyncio.timeout(timeout):  # not wait_for: no task per turn of the loop
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._wakeup.clear()

    def _dispatch(self) -> float | None:
        """Plan a batch per idle worker; returns when to look again even if nothing happens."""
        wake_at = None
        while self.scheduler.pending():
            now = self.clock.now()
            contexts = self.contexts()
            if self.pool.idle_count() == 0:
                if self.pool.broken():
                    for req in self.scheduler.drain():
                        self._fail(req, Unavailable("no worker is running and none could be started"))
                    break
                # No worker: still answer early whoever can no longer make it.
                self._expire(self.scheduler.expire(now, contexts), now)
                # A worker coming back (or the pool breaking) wakes the loop through pool.on_idle.
                wake_at = self.scheduler.next_expiry_s(contexts)
                break
            out = self.scheduler.schedule(now, contexts)
            self._expire(out.expired, now)
            if out.batch is None:
                wake_at = out.wake_at_s
                break
            try:
                self._launch(out.batch, self.contention())
            except Exception:  # out of the queues and not yet running: answer them here, then the loop drains
                for req in out.batch.requests:
                    self._fail(req, RequestError(INTERNAL_ERROR))
                raise
        return wake_at

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
        future = self.pool.submit(task)
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
        self._observe_overhead((now - batch.planned_at_s) * 1e3 - result.exec_ms)
        m = self.metrics
        level = f"{batch.plan.level:g}"
        m.batches.labels(batch.model, level).inc()
        m.batch_size.labels(batch.model).observe(len(batch.requests))
        m.exec_ms.labels(batch.model, level).observe(result.exec_ms)
        m.contention.set(contention)
        if result.exec_ms > batch.plan.predicted_ms:
            m.under_predicted.labels(batch.model).inc()
        self.scheduler.update_from_output(batch, result.exec_ms, now)
        self.latency.observe(batch.model, LatencySample(batch.plan.level, len(batch.requests), contention,
                                                        result.exec_ms, result.kernel))
        if self.on_batch:
            self.on_batch(batch, result.exec_ms, contention)

    def _retry(self, batch: Batch, exc: WorkerDied) -> None:
        """The batch's worker died: its requests are queued again, by deadline, for one more run.

        Not retried blindly as a batch: by the time a worker is free the deadlines have moved, and the
        scheduler decides again (a request that can no longer make it is answered DEADLINE_EXCEEDED at
        once instead of waiting for a replacement worker). A second death answers UNAVAILABLE.
        """
        live = [r for r in batch.requests if not r.handle.done()]
        if self._drained:  # shutting down (e.g. close() killed a worker that outran the grace period)
            for req in live:
                self._fail(req, Unavailable(f"server is shutting down; worker failed: {exc}"))
            return
        spent = self.scheduler.retry(live)
        requeued = [r for r in live if r.queued]  # retry() pushed them (a caller who left is not pushed)
        self.metrics.worker_deaths.labels(batch.model).inc()
        for req in requeued:
            self.metrics.retried.labels(req.model, req.slo_class).inc()
        log.warning("batch of %d (%s, level %g): %s; %d request(s) queued again, %d failed twice",
                    len(batch.requests), batch.model, batch.plan.level, exc, len(requeued), len(spent))
        for req in spent:
            self._fail(req, Unavailable(f"worker failed twice under this request: {exc}"))

    def _forget_stale_overhead(self) -> None:
        """Halve a raised overhead allowance for every OVERHEAD_STALE_S without a finished batch while
        admission is refusing requests as out of reach.

        The allowance is learned only from batches that ran. If a burst of contention raises it far
        enough, admission turns every request away, no batch runs, and it would never come down again:
        the server would refuse everything after the contention is gone, or serve nothing for a whole
        co-runner window (`python -m bench.adapt`). Without evidence it decays, so a
        few requests get through and measure the machine again.
        """
        if self.overhead_ms <= self.min_overhead_ms or not self._refused_since_batch:
            return  # an idle server keeps what it learned: the next burst meets the same machine
        now = self.clock.now()
        if now - self._last_batch_s > OVERHEAD_STALE_S:
            self.overhead_ms = max(self.min_overhead_ms, self.overhead_ms / 2)
            self._overheads.clear()  # the next estimate comes from batches run from here on
            self._last_batch_s = now

    def _observe_overhead(self, ms: float) -> None:
        """Learn what a batch costs beyond exec (IPC, event-loop delay): the planner must budget for it."""
        self._overheads.append(ms)
        self._batches_done += 1
        self._last_batch_s = self.clock.now()
        self._refused_since_batch = False
        if self._batches_done % 16 == 0:
            self.overhead_ms = max(self.min_overhead_ms, float(np.percentile(self._overheads, 95)))

    def _complete(self, batch: Batch, outputs: np.ndarray, exec_ms: float, kernel: str, now: float) -> None:
        plan = batch.plan
        levels = self.latency.table(batch.model).levels
        accuracy = self.accuracy[batch.model][levels.index(plan.level)]
        queue_ms = self.metrics.queue_ms
        for req, out in zip(batch.requests, outputs):
            if req.handle.done():
                continue  # the caller already left
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
