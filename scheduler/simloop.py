"""The simulator's event loop: the live dispatcher's shell around :class:`Driver`, on a virtual clock.

``slonn.scheduler.simulator.simulate`` builds one :class:`SimLoop` per run and reads its outcomes. An event
heap replaces asyncio and the worker pool: a batch finishes at ``now + exec + dispatch``, its exec time
drawn from the latency model at the true contention of that moment.
"""

from __future__ import annotations

from heapq import heappop, heappush
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from slonn.policy.table import LatencyTable
from slonn.scheduler.core import Batch
from slonn.scheduler.driver import Driver, caller_budget
from slonn.scheduler.errors import RequestError
from slonn.scheduler.queues import QueuedRequest
from slonn.scheduler.trace import Arrivals

if TYPE_CHECKING:  # simulator imports this module
    from slonn.scheduler.simulator import ContentionProfile, LatencyDraw, SimConfig

CLIENT_TIMEOUT = "CLIENT_TIMEOUT"  # same status the live replay records (slonn.scheduler.replay)


def admission_times(send_s: Sequence[float], cost_s: float) -> list[float]:
    """When each request clears a one-server FIFO of ``cost_s`` per request (``send_s`` nondecreasing)."""
    out, t = [], float("-inf")
    for s in send_s:
        t = (s if s > t else t) + cost_s
        out.append(t)
    return out


class Frontend:
    """The server's frontend as one server (its event-loop thread), FIFO as far as the event order allows:
    every piece of work starts when both its event has happened and the previous piece is done. Per request,
    ``request_s`` of CPU, half when it is admitted and half when it is answered; per batch, ``batch_s``, half
    to dispatch it (the worker starts after that) and half to take its result and fan it out."""

    __slots__ = ("request_s", "batch_s", "free_s", "work_s")

    def __init__(self, request_ms: float, batch_ms: float) -> None:
        self.request_s = request_ms * 1e-3
        self.batch_s = batch_ms * 1e-3
        self.free_s = float("-inf")
        """When the work taken on so far is done."""
        self.work_s = 0.0
        """CPU seconds of all the work taken on so far."""

    def take(self, at_s: float, cost_s: float) -> float:
        """Work of ``cost_s`` that can start at ``at_s``: when it is done."""
        start = at_s if at_s > self.free_s else self.free_s
        self.free_s = start + cost_s
        self.work_s += cost_s
        return self.free_s

    def cpu_s(self, now_s: float) -> float:
        """CPU spent by ``now_s`` (what the live server reads from its event-loop thread)."""
        ahead = self.free_s - now_s
        return self.work_s - ahead if ahead > 0.0 else self.work_s


class SimLoop:
    """The simulated server and its clients around one :class:`Driver`: what the live ``Dispatcher`` does
    on an event (an arrival, a finished batch, a wake-up: ask the driver for a batch per idle worker and
    answer the expired) and what the replay client does (give up after its timeout, cancelling a queued
    request). Per-request outcomes are filled in place; the records are built once at the end."""

    def __init__(self, driver: Driver, arrivals: Arrivals, deadline_ms: dict[str, float], table: LatencyTable,
                 draw: LatencyDraw, cfg: SimConfig, contention: ContentionProfile, model: str,
                 on_launch: Callable[[Batch], None] | None, frontend: Frontend | None = None) -> None:
        self.driver = driver
        self.frontend = frontend
        """The frontend as a one-server resource, or None (free, as before it was modelled)."""
        self.table = table
        self.draw = draw
        self.contention = contention
        self.model = model
        self.on_launch = on_launch
        self.deadline_ms = deadline_ms
        n = self.n = len(arrivals)
        # Typed lists: compiled, an element read is a native list access and an unboxed float (numpy's
        # tolist() is untyped, and every read of its result would go through the generic item protocol).
        self.offsets: list[float] = arrivals.offsets_s.tolist()
        self.cls_names: list[str] = list(arrivals.classes)
        # Client timeouts, in time order (one per request; most find the request long answered).
        give_up = np.asarray(self.offsets) + np.asarray([deadline_ms[c] for c in self.cls_names]) * (
            1e-3 * cfg.timeout_factor) + 1.0
        self.give_up_order: list[int] = np.argsort(give_up, kind="stable").tolist()
        self.give_up: list[float] = give_up.tolist()
        self.ingress = cfg.ingress_ms_per_request > 0
        self.reach: list[float] = admission_times(self.offsets, cfg.ingress_ms_per_request * 1e-3) \
            if self.ingress else self.offsets
        """When each request reaches the scheduler (its send time unless the frontend is modelled)."""
        self.status: list[str | None] = [None] * n
        self.answer_s = [float("nan")] * n
        self.out_level = [float("nan")] * n
        self.out_li = [0] * n  # the index of out_level in the table (looked up once per batch, not per request)
        self.out_late = [False] * n  # served late on purpose (the plan's flag, as the live server answers it)
        self.out_batch = [0] * n
        self.out_exec = [float("nan")] * n
        self.out_pred = [float("nan")] * n
        self.reqs: list[QueuedRequest | None] = [None] * n  # admitted: the client cancels it on giving up
        self.running: list[tuple[float, int, Batch, float, int]] = []  # (finish_s, tie, batch, exec_ms, level)
        self.replies: list[tuple[float, int, Batch, float, int]] = []
        """Batches whose worker finished, as ``running``, by when the frontend has taken their result (only with
        the frontend modelled: the worker is free again then, as the live pool's future completes then)."""
        self.free = cfg.workers
        self.wake_at = float("inf")
        self.batches = 0
        self.next_arrival = 0
        self.next_give_up = 0
        self.now_s = 0.0
        self.dispatch_s = cfg.dispatch_ms * 1e-3
        self.reply_s = cfg.reply_ms_per_request * 1e-3

    def run(self) -> None:
        """Every event in time order until none is left (arrivals first on a tie, then finished batches)."""
        inf = float("inf")
        fe = self.frontend
        while True:
            running, replies = self.running, self.replies
            t_run = running[0][0] if running else inf
            t_rep = replies[0][0] if replies else inf
            t_fin = t_run if t_run < t_rep else t_rep
            t_next = t_fin if t_fin < self.wake_at else self.wake_at
            t_arr = inf
            if self.next_arrival < self.n:
                t_arr = self.reach[self.next_arrival]
                if fe is not None:  # admission waits for the frontend, and takes half a request's cost
                    t_arr = (t_arr if t_arr > fe.free_s else fe.free_s) + fe.request_s * 0.5
            now = t_arr if t_arr < t_next else t_next
            if now == inf:
                break
            if fe is not None and t_run <= now and t_run <= t_rep and t_arr > t_next:
                # A worker finished: the frontend takes its result when it can; the batch is answered then.
                _, tie, batch, exec_ms, li = heappop(running)
                done = fe.take(t_run, fe.batch_s * 0.5 + len(batch.requests) * fe.request_s * 0.5)
                heappush(replies, (done, tie, batch, exec_ms, li))
                continue
            # Client give-ups due by now. Their only effect on the server is to cancel a queued request,
            # which nothing reacts to until the next event: applying them just before it is exact.
            self._give_up(now)
            self.now_s = now
            if t_arr <= t_next:
                self._arrive(now)
                if fe is not None:
                    fe.take(now - fe.request_s * 0.5, fe.request_s * 0.5)
                    k = self.next_arrival
                    if k < self.n and self.reach[k] <= now:
                        # The next request is already waiting for the loop: it is admitted before the
                        # dispatcher's turn comes (callbacks run in order), as on a busy live event loop.
                        continue
            elif t_fin <= now:
                self._finish(now)
            self._dispatch(now)

    def _give_up(self, now: float) -> None:
        order, give_up, status = self.give_up_order, self.give_up, self.status
        j = self.next_give_up
        while j < self.n and give_up[order[j]] <= now:
            k = order[j]
            j += 1
            if status[k] is None:
                status[k], self.answer_s[k] = CLIENT_TIMEOUT, give_up[k]
                self.driver.release()
                req = self.reqs[k]
                if req is not None:
                    self.driver.cancel(req)  # as the live servicer does when its caller leaves
        self.next_give_up = j

    def _arrive(self, now: float) -> None:
        k = self.next_arrival
        self.next_arrival = k + 1
        cls = self.cls_names[k]
        try:
            budget_ms, hard = 0.0, False
            if self.frontend is not None and now > self.offsets[k]:
                # The deadline counts from the send; the class still decides what a late request gets.
                left_ms = self.deadline_ms[cls] - (now - self.offsets[k]) * 1e3
                budget_ms = left_ms if left_ms != 0.0 else -1e-9
            elif self.ingress and now > self.offsets[k]:
                # The caller's deadline counts from its send (the live server reads it from the call's gRPC
                # deadline): the scheduler gets what is left, as a hard deadline.
                left_ms = self.deadline_ms[cls] - (now - self.offsets[k]) * 1e3
                budget_ms, hard = caller_budget(0.0, left_ms, 0.0)
            self.reqs[k] = self.driver.admit(self.model, cls, now, None, k, budget_ms, hard)
        except RequestError as exc:  # refused at admission, as the live servicer answers it
            self.status[k], self.answer_s[k] = exc.kind.value, now

    def _finish(self, now: float) -> None:
        """A batch finished: answer it, free the worker, feed back."""
        _, _, batch, exec_ms, li = heappop(self.replies if self.frontend is not None else self.running)
        self.free += 1
        plan = batch.plan
        size = len(batch.requests)
        status = self.status
        for pos, req in enumerate(batch.requests):
            k: int = req.handle
            if status[k] is None:
                missed = self.driver.missed(req, now)
                if missed is not None:  # as the live dispatcher answers it
                    status[k], self.answer_s[k] = missed.kind.value, now
                    self.driver.release()
                    continue
                status[k] = "OK"
                self.answer_s[k] = now + pos * self.reply_s
                self.out_level[k], self.out_batch[k], self.out_exec[k] = plan.level, size, exec_ms
                self.out_pred[k], self.out_li[k], self.out_late[k] = plan.predicted_ms, li, plan.late
                self.driver.release()
        self.driver.on_batch_done(batch, exec_ms, now)

    def _dispatch(self, now: float) -> None:
        """What Dispatcher._dispatch does: the driver's batch per idle worker, its expired answered."""
        out = self.driver.next_batches(self.free, now)
        for req in out.expired:
            k: int = req.handle
            if self.status[k] is None:
                self.status[k], self.answer_s[k] = "DEADLINE_EXCEEDED", now
                self.driver.release()
        for batch in out.batches:
            li = self.table.level_index(batch.plan.level)
            exec_ms = self.draw(self.contention.at(now), li, len(batch.requests))
            self.batches += 1
            self.free -= 1
            start = now if self.frontend is None else self.frontend.take(now, self.frontend.batch_s * 0.5)
            heappush(self.running, (start + exec_ms * 1e-3 + self.dispatch_s, self.batches, batch, exec_ms, li))
            if self.on_launch is not None:
                self.on_launch(batch)
        wake = out.wake_at_s
        self.wake_at = float("inf") if wake is None else wake
