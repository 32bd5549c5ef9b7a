"""The scheduler core: queues + policy, synchronous and clock-free.

Like vLLM's Scheduler: ``add_request``, ``schedule(now) -> SchedulerOutput``,
``update_from_output``. The asyncio dispatcher (live server) and the
discrete-event simulator both drive this class; neither has scheduling
logic of its own.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any, Mapping

from slonn.policy.names import OnLate
from slonn.policy.planner import Pending, Plan, PlanContext, Policy, Wait, backlog_ms
from slonn.scheduler.config import SLOClassConfig
from slonn.scheduler.errors import DeadlineUnreachable, FailedPrecondition, NotFound, QueueFull
from slonn.scheduler.queues import QueuedRequest, RequestQueue, peek_merged, pop_merged


MAX_ATTEMPTS = 2
"""Runs a request gets when workers die under it: the first and one retry."""


class Batch:
    """Requests of one model to run together at one level (a slotted class, like Plan: one per batch on the
    hot path of the server and the simulator, native under mypyc)."""

    __slots__ = ("model", "requests", "plan", "planned_at_s", "node")

    def __init__(self, model: str, requests: list[QueuedRequest], plan: Plan, planned_at_s: float) -> None:
        self.model = model
        self.requests = requests
        self.plan = plan
        self.planned_at_s = planned_at_s
        self.node = ""
        """The node whose worker the batch was planned for ("": one machine; see Driver.set_nodes)."""


class SchedulerOutput:
    """What one ``Scheduler.schedule`` call decided."""

    __slots__ = ("batch", "expired", "wake_at_s")

    def __init__(self, expired: list[QueuedRequest]) -> None:
        self.batch: Batch | None = None
        self.expired = expired
        """Requests that can no longer make their deadline (class on_late='reject')."""
        self.wake_at_s: float | None = None
        """When the policy wants to decide again even if nothing arrives."""


class Scheduler:
    """Per-(model, class) queues and one policy. Not thread-safe: one loop owns it."""

    def __init__(self, models: Mapping[str, tuple[float, ...]], classes: Mapping[str, SLOClassConfig],
                 policy: Policy) -> None:
        """``models`` maps a model name to its levels' accuracies, the dense level (1.0) first."""
        self.classes = dict(classes)
        self.policy = policy
        self._seq = itertools.count()
        self._model_classes: dict[str, dict[str, SLOClassConfig]] = {
            m: {c.name: c.for_model(m, acc[0]) for c in classes.values()} for m, acc in models.items()}
        """model -> class -> the class as it applies to that model (override, relative floor resolved)."""
        self._queues: dict[str, dict[str, RequestQueue]] = {
            m: {c.name: RequestQueue(policy.order_key, c.max_queue) for c in mc.values()}
            for m, mc in self._model_classes.items()
        }
        self._best_accuracy = {m: max(acc) for m, acc in models.items()}
        self._all_queues = [q for qs in self._queues.values() for q in qs.values()]
        self._queue_lists = {m: list(qs.values()) for m, qs in self._queues.items()}
        self._ahead = {m: {c: [q for name, q in qs.items()
                               if self._model_classes[m][name].latency_ms <= self._model_classes[m][c].latency_ms]
                           for c in qs} for m, qs in self._queues.items()}
        """model -> class -> the queues whose requests are (about) ahead of that class's in EDF."""
        self._only_model = next(iter(self._queues)) if len(self._queues) == 1 else None
        self._mixed_late = False
        """Some request of a late-serving class must not be served late (see make_request's ``hard``)."""

    # -- admission -------------------------------------------------------

    def make_request(self, model: str, slo_class: str, arrival_s: float, inputs: Any = None,
                     budget_ms: float | None = None, handle: Any = None, hard: bool = False) -> QueuedRequest:
        """Build a request with its deadline: the class's, tightened (never loosened) by ``budget_ms``.

        ``hard``: ``budget_ms`` is the caller's own deadline (e.g. its gRPC deadline), after which nobody
        listens. When that deadline is the binding one, serving late is pointless whatever the class's
        ``on_late`` says, so the request is handled as ``on_late='reject'`` (checked at admission, expired
        early) instead of holding a queue slot and a worker for an answer nobody reads.
        """
        if model not in self._queues:
            raise NotFound(f"model {model!r} is not served; served models: {sorted(self._queues)}")
        cls = self._model_classes[model].get(slo_class)
        if cls is None:
            raise NotFound(f"slo_class {slo_class!r} is not configured; classes: {sorted(self.classes)}")
        if cls.min_accuracy > self._best_accuracy[model]:
            raise FailedPrecondition(
                f"slo_class {slo_class!r} min_accuracy={cls.min_accuracy:g} (for this model) is above model "
                f"{model!r}'s best level accuracy {self._best_accuracy[model]:.4f}")
        class_ms, class_on_late = cls.latency_ms, cls.on_late
        latency_ms = class_ms if not budget_ms else min(class_ms, budget_ms)
        on_late = OnLate.REJECT if hard and budget_ms and budget_ms <= class_ms else class_on_late
        if on_late != class_on_late:
            self._mixed_late = True  # from now on, schedule() checks such requests behind late heads
        pending = Pending(next(self._seq), arrival_s, arrival_s + latency_ms * 1e-3, cls.min_accuracy,
                          cls.priority, cls.mode, on_late)
        return QueuedRequest(pending, model, slo_class, inputs, handle)

    def queue_limit(self, model: str, slo_class: str) -> int | None:
        """The ``max_queue`` of ``slo_class`` as it applies to ``model`` (None: no such model or class)."""
        queue = self._queues.get(model, {}).get(slo_class)
        return None if queue is None else queue.max_len

    def add_request(self, req: QueuedRequest, now_s: float, ctx: PlanContext) -> None:
        """Queue ``req`` or raise QueueFull / DeadlineUnreachable (answered at once, never queued)."""
        queue = self._queues[req.model][req.slo_class]
        if queue.full():
            raise QueueFull(f"slo_class {req.slo_class!r} queue for model {req.model!r} is full "
                            f"(max_queue={queue.max_len})")
        if req.pending.on_late == OnLate.REJECT:
            # Requests of classes with deadlines no later than this one's are (about) ahead of it in EDF.
            ahead = 0
            for q in self._ahead[req.model][req.slo_class]:
                ahead += q._live
            backlog = backlog_ms(ahead, req.pending.min_accuracy, ctx)
            admit_ctx = replace(ctx, backlog_ms=backlog) if backlog else ctx
            if self.policy.is_hopeless(req.pending, now_s, admit_ctx):
                budget_ms = (req.pending.deadline_s - now_s) * 1e3
                raise DeadlineUnreachable(
                    f"latency budget {budget_ms:.2f} ms cannot be met for slo_class {req.slo_class!r}: "
                    f"{ahead} request(s) queued ahead ({admit_ctx.backlog_ms:.1f} ms) plus the fastest allowed "
                    f"level's predicted latency")
        queue.push(req)

    def cancel(self, req: QueuedRequest) -> None:
        """The caller left: drop ``req`` if it is still queued (no-op once it is in a batch)."""
        self._queues[req.model][req.slo_class].cancel(req)

    # -- scheduling ------------------------------------------------------

    def pending(self, model: str | None = None) -> int:
        if model is None:
            n = 0
            for q in self._all_queues:  # called per event by both drivers: a loop of native field reads
                n += q._live
            return n
        n = 0
        for q in self._queue_lists[model]:
            n += q._live
        return n

    def queue_lengths(self) -> dict[tuple[str, str], int]:
        return {(m, c): len(q) for m, qs in self._queues.items() for c, q in qs.items()}

    def expire(self, now_s: float, contexts: Mapping[str, PlanContext]) -> list[QueuedRequest]:
        """Remove and return the requests that can no longer make their deadline (class on_late='reject').

        Call it even when no worker is free: a request must not wait for a
        worker only to learn it is late.
        """
        expired: list[QueuedRequest] = []
        try:
            for model, queues in self._queue_lists.items():
                self._expire(queues, now_s, contexts[model], expired)
        except BaseException:
            self._requeue(expired)  # a check that raises loses nobody: the caller's error path drains them
            raise
        return expired

    def next_expiry_s(self, contexts: Mapping[str, PlanContext]) -> float | None:
        """Earliest time a queued head turns hopeless (when to call ``expire`` next), or None."""
        soonest = None
        for model, queues in self._queues.items():
            ctx = contexts[model]
            for q in queues.values():
                head = q.peek()
                if head is None or head.pending.on_late != OnLate.REJECT:
                    continue
                t = self.policy.hopeless_at(head.pending, ctx)
                if t is not None and (soonest is None or t < soonest):
                    soonest = t
        return soonest

    def schedule(self, now_s: float, contexts: Mapping[str, PlanContext],
                 judge: Mapping[str, PlanContext] | None = None) -> SchedulerOutput:
        """Expire hopeless requests, then plan at most one batch (call once per free worker).

        ``judge``: the contexts that say whether a request is hopeless, when they are not those the batch is
        planned with (a batch for a slow node's worker: a request it cannot serve in time may still make it
        on a faster one)."""
        if judge is None:
            judge = contexts
        out = SchedulerOutput(expired=self.expire(now_s, judge))
        candidates: list[QueuedRequest] = []
        try:
            return self._schedule(now_s, contexts, out, candidates, judge)
        except BaseException:
            # A decision that raises loses nobody: what it had taken out (and what it had expired, which the
            # caller never gets) goes back to the queues, where the caller's error path drains and answers it.
            self._requeue(candidates)
            self._requeue(out.expired)
            raise

    def _schedule(self, now_s: float, contexts: Mapping[str, PlanContext], out: SchedulerOutput,
                  candidates: list[QueuedRequest], judge: Mapping[str, PlanContext]) -> SchedulerOutput:
        """``schedule`` after expiry; every request it takes out of the queues is in ``candidates`` or
        ``out.expired`` until it returns.

        Several models: the most urgent one's batch; if its policy waits (for a larger batch), the next most
        urgent model's, and so on: one model's wait holds up no other's. With no batch, ``out.wake_at_s`` is
        the earliest of the waits' ends."""
        if self._only_model is not None:  # the common case: no need to compare heads
            live = self.pending()
            if live:
                until_s = self._schedule_model(self._only_model, live, now_s, contexts, out, candidates, judge)
                if until_s is not None:
                    out.wake_at_s = until_s
            return out
        passed: list[str] = []  # models whose policy waits this round, or with nothing left to plan
        while True:
            urgent = self._most_urgent_model(passed)
            if urgent is None:
                return out
            until_s = self._schedule_model(urgent, -1, now_s, contexts, out, candidates, judge)
            if out.batch is not None:
                return out
            if until_s is not None and (out.wake_at_s is None or until_s < out.wake_at_s):
                out.wake_at_s = until_s
            passed.append(urgent)

    def _schedule_model(self, model: str, live: int, now_s: float, contexts: Mapping[str, PlanContext],
                        out: SchedulerOutput, candidates: list[QueuedRequest],
                        judge: Mapping[str, PlanContext]) -> float | None:
        """Plan ``model``'s batch into ``out.batch``, or return when its policy waits until (None: planned, or
        nothing of the model's is left to plan). ``live``: its live requests, when already counted (else -1).
        Leaves ``candidates`` empty unless it planned a batch."""
        ctx = contexts[model]
        queues = self._queue_lists[model]
        if self.policy.may_wait and not self._mixed_late:
            # Ask first whether the decision would be a wait: popping and requeueing the candidates costs more
            # than the decision (dynamic batching waits about once per batch).
            head = peek_merged(queues)
            if head is not None:
                if live < 0:
                    live = self.pending(model)
                until_s = self.policy.wait_until(head.pending, min(live, ctx.max_batch), now_s, ctx)
                if until_s is not None:
                    return until_s
        candidates.extend(pop_merged(queues, ctx.max_batch))
        while self._mixed_late:
            self._drop_hopeless_hard(candidates, now_s, judge[model], out.expired)
            if candidates or not self.pending(model):
                break
            candidates.extend(pop_merged(queues, ctx.max_batch))  # every candidate was dropped: the next ones
        if not candidates:
            return None
        decision = self.policy.plan([r.pending for r in candidates], now_s, ctx)
        if isinstance(decision, Wait):
            self._requeue(candidates)
            candidates.clear()  # back in the queues: an error later in this round must not requeue them again
            return decision.until_s
        if decision.count < len(candidates):
            chosen = candidates[:decision.count]
            self._requeue(candidates[decision.count:])
        else:  # the whole candidate list (the common case at low load: one candidate)
            chosen = candidates
        for r in chosen:
            r.late = decision.late
        out.batch = Batch(model, chosen, decision, now_s)  # the server logs why (Dispatcher._launch)
        return None

    def _drop_hopeless_hard(self, candidates: list[QueuedRequest], now_s: float, ctx: PlanContext,
                            expired: list[QueuedRequest]) -> None:
        """Requests of a late-serving class that must not be served late (their caller's deadline binds)
        can sit behind a late head that ``expire`` stops at: catch the hopeless ones before they are
        planned into a late batch nobody reads. Moves them from ``candidates`` (in place) to ``expired``,
        all at once after every check, so that a check that raises leaves each request in one list."""
        keep, dropped = [], []
        for r in candidates:
            if r.pending.on_late == OnLate.REJECT and self._model_classes[r.model][r.slo_class].on_late != OnLate.REJECT \
                    and self.policy.is_hopeless(r.pending, now_s, ctx):
                dropped.append(r)
            else:
                keep.append(r)
        candidates[:] = keep
        expired.extend(dropped)

    def retry(self, requests: list[QueuedRequest]) -> list[QueuedRequest]:
        """Requests of a batch whose worker died go back to their queues for one more run.

        Back in the queue they are ordinary requests again: EDF puts them ahead of later deadlines, and
        one that can no longer make its deadline is expired (class ``on_late='reject'``) or served late,
        like any other. Queue limits do not apply: they were admitted once. Returns the requests that
        already had their retry; the caller answers them UNAVAILABLE.
        """
        spent = []
        for r in requests:
            r.attempts += 1
            if r.attempts >= MAX_ATTEMPTS:
                spent.append(r)
            else:
                r.late = False
                self._queues[r.model][r.slo_class].push(r)  # a caller who left is skipped by push
        return spent

    def requeue(self, requests: list[QueuedRequest]) -> None:
        """Put back requests that ``schedule`` or ``expire`` handed out and that were neither run nor answered
        (a caller whose round of decisions failed part-way)."""
        self._requeue(requests)

    def update_from_output(self, batch: Batch, exec_ms: float, finished_s: float) -> None:
        """Feedback after a batch ran (stateful policies adapt)."""
        met = all(finished_s <= r.pending.deadline_s for r in batch.requests)
        self.policy.observe(batch.plan, exec_ms, met, finished_s)

    def drain(self) -> list[QueuedRequest]:
        """Remove every queued request (shutdown)."""
        return [r for qs in self._queues.values() for q in qs.values() for r in q.drain()]

    def _expire(self, queues: list[RequestQueue], now_s: float, ctx: PlanContext, expired: list[QueuedRequest]) -> None:
        for q in queues:
            while True:
                head = q.peek()
                # Only heads: behind an in-time head every request has a later deadline.
                if head is None or head.pending.on_late != OnLate.REJECT or not self.policy.is_hopeless(
                        head.pending, now_s, ctx):
                    break
                expired.append(q.pop())

    def _most_urgent_model(self, passed: list[str]) -> str | None:
        """The model whose queued head comes first in the policy's order (several models served), of those
        not in ``passed``."""
        best, best_key = None, None
        for model, queues in self._queues.items():
            if passed and model in passed:
                continue
            for q in queues.values():
                k = q.peek_key()
                if k is not None and (best_key is None or k < best_key):
                    best, best_key = model, k
        return best

    def _requeue(self, reqs: list[QueuedRequest]) -> None:
        for r in reqs:
            self._queues[r.model][r.slo_class].push(r)
