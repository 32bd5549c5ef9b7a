"""Scheduler core on a FakeClock, driven like vLLM's scheduler tests: add_request, schedule(now), outputs."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from slonn.policy.baselines import make_baseline
from slonn.policy.planner import PlanContext, RecentSlowdown, SLOAwarePolicy, Wait
from slonn.policy.table import LatencyTable
from slonn.scheduler.clock import FakeClock
from slonn.scheduler.config import SLOClassConfig
from slonn.scheduler.core import Scheduler
from slonn.scheduler.errors import DeadlineUnreachable, ErrorKind, FailedPrecondition, NotFound, QueueFull
from tests.fakes import WrappedPolicy

LEVELS = (1.0, 0.5, 0.25, 0.1)
ACCURACY = (0.99, 0.97, 0.95, 0.90)
TABLE = LatencyTable.constant(LEVELS, max_batch=64, per_item_ms=1.0)  # ms = batch * level
CLASSES = {c.name: c for c in (
    SLOClassConfig("interactive", latency_ms=20, priority=0, max_queue=4, on_late="reject"),
    SLOClassConfig("standard", latency_ms=20, priority=1, max_queue=100, on_late="reject"),
    SLOClassConfig("batch", latency_ms=500, priority=2, max_queue=100, on_late="serve", mode="accuracy"),
    SLOClassConfig("precise", latency_ms=100, min_accuracy=0.97, priority=1, max_queue=100),
    SLOClassConfig("too-precise", latency_ms=100, min_accuracy=0.999),
)}


class RecordingPolicy(WrappedPolicy):
    def __init__(self) -> None:
        super().__init__()
        self.observed: list[tuple[float, bool]] = []

    def observe(self, plan, exec_ms, deadline_met, finished_s):
        self.observed.append((exec_ms, deadline_met))


class WaitPolicy(WrappedPolicy):
    def plan(self, candidates, now_s, ctx):
        return Wait(now_s + 0.005)


def make(policy=None, models=("m",), table=TABLE, max_batch=64):
    sched = Scheduler({m: ACCURACY for m in models}, CLASSES, policy or SLOAwarePolicy())
    ctxs = {m: PlanContext(table, 0, ACCURACY, max_batch) for m in models}
    return sched, ctxs, FakeClock(1000.0)


def submit(sched, ctxs, clock, slo_class, model="m", budget_ms=None):
    req = sched.make_request(model, slo_class, clock.now(), inputs=None, budget_ms=budget_ms)
    sched.add_request(req, clock.now(), ctxs[model])
    return req


# -- admission -------------------------------------------------------------


@pytest.mark.parametrize(("budget_ms", "expected_ms"), [(None, 20), (0, 20), (5, 5), (19.5, 19.5), (50, 20)])
def test_budget_tightens_but_never_loosens_the_deadline(budget_ms, expected_ms):
    sched, _, clock = make()
    req = sched.make_request("m", "interactive", clock.now(), budget_ms=budget_ms)
    assert req.pending.deadline_s == pytest.approx(clock.now() + expected_ms * 1e-3)
    assert req.pending.arrival_s == clock.now()


def test_request_carries_its_class_settings():
    sched, _, clock = make()
    a = sched.make_request("m", "batch", clock.now(), inputs="x", handle="h")
    b = sched.make_request("m", "batch", clock.now())
    p = a.pending
    assert (p.min_accuracy, p.priority, p.mode, p.on_late) == (0.0, 2, "accuracy", "serve")
    assert (a.model, a.slo_class, a.inputs, a.handle) == ("m", "batch", "x", "h")
    assert b.pending.seq > a.pending.seq


def test_unknown_model_and_class_are_not_found():
    sched, _, clock = make()
    with pytest.raises(NotFound, match="model 'nope'") as info:
        sched.make_request("nope", "interactive", clock.now())
    assert info.value.kind == ErrorKind.NOT_FOUND
    with pytest.raises(NotFound, match="slo_class 'nope'") as info:
        sched.make_request("m", "nope", clock.now())
    assert info.value.kind == ErrorKind.NOT_FOUND
    assert "interactive" in str(info.value)  # lists the configured classes


def test_class_floor_above_every_level_is_failed_precondition():
    sched, _, clock = make()
    with pytest.raises(FailedPrecondition, match="min_accuracy=0.999") as info:
        sched.make_request("m", "too-precise", clock.now())
    assert info.value.kind == ErrorKind.FAILED_PRECONDITION


def test_queue_full_at_max_queue():
    sched, ctxs, clock = make()
    reqs = [submit(sched, ctxs, clock, "interactive") for _ in range(4)]
    with pytest.raises(QueueFull, match="max_queue=4") as info:
        submit(sched, ctxs, clock, "interactive")
    assert info.value.kind == ErrorKind.RESOURCE_EXHAUSTED
    assert sched.pending() == 4
    submit(sched, ctxs, clock, "standard")  # other classes have their own queues
    sched.cancel(reqs[0])
    submit(sched, ctxs, clock, "interactive")  # a cancelled request frees its slot
    assert sched.queue_lengths()[("m", "interactive")] == 4


def test_hopeless_request_rejected_at_admission_and_not_queued():
    sched, ctxs, clock = make()
    # Fastest level (0.1) runs one request in 0.1 ms: a 0.05 ms budget cannot be met.
    with pytest.raises(DeadlineUnreachable) as info:
        submit(sched, ctxs, clock, "interactive", budget_ms=0.05)
    assert info.value.kind == ErrorKind.DEADLINE_EXCEEDED
    assert sched.pending() == 0
    submit(sched, ctxs, clock, "interactive", budget_ms=0.2)
    assert sched.pending() == 1


def test_hopeless_request_of_a_serve_class_is_admitted():
    sched, ctxs, clock = make()
    submit(sched, ctxs, clock, "batch", budget_ms=0.05)
    assert sched.pending() == 1


@pytest.mark.parametrize(("budget_ms", "expected_on_late"), [(0.05, "reject"), (500, "reject"), (900, "serve")])
def test_a_binding_caller_deadline_makes_a_serve_class_request_reject(budget_ms, expected_on_late):
    # Nobody reads an answer after the caller's own (gRPC) deadline: when it binds, no late service.
    sched, ctxs, clock = make()
    req = sched.make_request("m", "batch", clock.now(), budget_ms=budget_ms, hard=True)
    assert req.pending.on_late == expected_on_late
    if expected_on_late == "reject" and budget_ms < 0.1:
        with pytest.raises(DeadlineUnreachable):
            sched.add_request(req, clock.now(), ctxs["m"])
    # The same budget as a mere request option keeps the class's late service.
    soft = sched.make_request("m", "batch", clock.now(), budget_ms=budget_ms)
    assert soft.pending.on_late == "serve"


def test_floor_decides_the_fastest_level_at_admission():
    sched, ctxs, clock = make()
    # "precise" needs 0.97: the fastest allowed level is 0.5 (0.5 ms), so 0.3 ms is hopeless for it.
    with pytest.raises(DeadlineUnreachable):
        submit(sched, ctxs, clock, "precise", budget_ms=0.3)
    submit(sched, ctxs, clock, "standard", budget_ms=0.3)


@pytest.mark.parametrize(("safe_over_mean", "refused_ms", "admitted_ms"), [(1, 0.85, 0.95), (5, 4.05, 4.15)])
def test_backlog_ahead_counts_at_admission_at_the_safe_bound(safe_over_mean, refused_ms, admitted_ms):
    mean = TABLE.mean_ms
    table = LatencyTable(LEVELS, 64, (), safe_over_mean * mean, mean.copy())
    sched, ctxs, clock = make(max_batch=4, table=table)
    submit(sched, ctxs, clock, "standard", budget_ms=0.85)  # empty queue: 0.1 ms on the mean, fine
    for _ in range(7):
        submit(sched, ctxs, clock, "standard")
    # 8 queued ahead = 2 full batches of 4 at level 0.1, each at its safe bound (0.4 ms on the mean), before
    # this one's 0.1 ms on the mean.
    with pytest.raises(DeadlineUnreachable, match="8 request"):
        submit(sched, ctxs, clock, "standard", budget_ms=refused_ms)
    submit(sched, ctxs, clock, "standard", budget_ms=admitted_ms)
    assert sched.pending() == 9


class RaisingPolicy(WrappedPolicy):
    def plan(self, candidates, now_s, ctx):
        raise RuntimeError("a bad decision")


def test_a_decision_that_raises_puts_every_request_back_for_the_error_path_to_answer():
    sched, ctxs, clock = make(policy=RaisingPolicy())
    late = submit(sched, ctxs, clock, "standard", budget_ms=0.5)
    reqs = [submit(sched, ctxs, clock, "standard") for _ in range(3)]
    clock.advance(0.001)  # the first is now hopeless: expired in the same call that then raises
    with pytest.raises(RuntimeError):
        sched.schedule(clock.now(), ctxs)
    assert sched.pending() == 4
    assert set(sched.drain()) == {late, *reqs}


class FailsOnCall(WrappedPolicy):
    """Raises on the ``n``-th call of ``method`` (1-based), as a bug would."""

    def __init__(self, method: str, n: int, may_wait: bool = False) -> None:
        super().__init__()
        self.method, self.n, self.calls, self.may_wait = method, n, 0, may_wait

    def _tick(self, method: str) -> None:
        if method == self.method:
            self.calls += 1
            if self.calls == self.n:
                raise RuntimeError(f"a bad {method}")

    def is_hopeless(self, p, now_s, ctx):
        self._tick("is_hopeless")
        return super().is_hopeless(p, now_s, ctx)

    def wait_until(self, head, count, now_s, ctx):
        self._tick("wait_until")
        return None


def _raises_and_keeps_everyone(sched, ctxs, clock, reqs) -> None:
    with pytest.raises(RuntimeError):
        sched.schedule(clock.now(), ctxs)
    assert sched.pending() == len(reqs)  # each back in its queue exactly once
    drained = sched.drain()
    assert len(drained) == len(reqs) and set(drained) == set(reqs)


def test_an_expiry_check_that_raises_midway_puts_back_what_it_had_expired():
    sched, ctxs, clock = make(policy=FailsOnCall("is_hopeless", 4))  # calls 1-2: admission
    reqs = [submit(sched, ctxs, clock, c, budget_ms=0.5) for c in ("interactive", "standard")]
    clock.advance(0.001)  # both heads hopeless; the check of the second raises
    _raises_and_keeps_everyone(sched, ctxs, clock, reqs)


def test_a_wait_check_that_raises_puts_back_what_expiry_took():
    sched, ctxs, clock = make(policy=FailsOnCall("wait_until", 1, may_wait=True))
    reqs = [submit(sched, ctxs, clock, "standard", budget_ms=0.5), submit(sched, ctxs, clock, "standard")]
    clock.advance(0.001)  # the first is expired, then the wait check raises
    _raises_and_keeps_everyone(sched, ctxs, clock, reqs)


def test_a_late_serve_head_check_that_raises_queues_nobody_twice():
    sched, ctxs, clock = make(policy=FailsOnCall("is_hopeless", 4))
    late_head = submit(sched, ctxs, clock, "batch", budget_ms=0.05)  # soft: served late
    hard = [sched.make_request("m", "batch", clock.now(), budget_ms=b, hard=True) for b in (0.5, 0.6)]
    for r in hard:
        sched.add_request(r, clock.now(), ctxs["m"])  # is_hopeless calls 1 and 2 (admission)
    clock.advance(0.002)  # the first hard one is dropped behind the late head, the check of the next raises
    _raises_and_keeps_everyone(sched, ctxs, clock, [late_head, *hard])


# -- scheduling ------------------------------------------------------------


def test_schedule_with_nothing_queued():
    sched, ctxs, clock = make()
    out = sched.schedule(clock.now(), ctxs)
    assert out.batch is None and out.expired == [] and out.wake_at_s is None


def test_mixed_classes_batch_in_edf_order_with_priority_tie_break():
    sched, ctxs, clock = make()
    std1 = submit(sched, ctxs, clock, "standard")      # deadline t+20 ms, priority 1
    bat1 = submit(sched, ctxs, clock, "batch")         # deadline t+500 ms
    int1 = submit(sched, ctxs, clock, "interactive")   # deadline t+20 ms, priority 0
    clock.advance(0.001)
    int2 = submit(sched, ctxs, clock, "interactive")   # t+21 ms
    std2 = submit(sched, ctxs, clock, "standard")      # t+21 ms
    out = sched.schedule(clock.now(), ctxs)
    assert out.batch is not None and out.expired == []
    assert out.batch.model == "m"
    assert out.batch.requests == [int1, std1, int2, std2, bat1]
    assert (out.batch.plan.count, out.batch.plan.level) == (5, 1.0)
    assert out.batch.planned_at_s == clock.now()
    assert sched.pending() == 0


def test_expire_hopeless_heads_of_reject_classes_keep_serve_classes():
    sched, ctxs, clock = make()
    rejects = [submit(sched, ctxs, clock, "interactive") for _ in range(3)]
    serves = [submit(sched, ctxs, clock, "batch") for _ in range(3)]
    clock.advance(0.01995)  # 0.05 ms left for interactive: below the fastest level's 0.1 ms
    out = sched.schedule(clock.now(), ctxs)
    assert out.expired == rejects
    assert out.batch is not None and out.batch.requests == serves
    assert not out.batch.plan.late
    assert sched.pending() == 0


def test_expire_keeps_heads_that_can_still_make_it():
    sched, ctxs, clock = make()
    reqs = [submit(sched, ctxs, clock, "interactive") for _ in range(3)]
    clock.advance(0.0195)  # 0.5 ms left: level 0.1 runs all three in 0.3 ms
    out = sched.schedule(clock.now(), ctxs)
    assert out.expired == []
    assert out.batch.requests == reqs and out.batch.plan.level == 0.1


def test_late_serve_requests_are_kept_and_planned_late():
    sched, ctxs, clock = make()
    reqs = [submit(sched, ctxs, clock, "batch") for _ in range(2)]
    clock.advance(0.6)  # 100 ms past the deadline
    out = sched.schedule(clock.now(), ctxs)
    assert out.expired == []
    assert out.batch.requests == reqs
    assert out.batch.plan.late
    assert all(r.late for r in reqs)


def test_cancel_removes_from_the_next_batch():
    sched, ctxs, clock = make()
    a, b, c = (submit(sched, ctxs, clock, "standard") for _ in range(3))
    sched.cancel(b)
    assert sched.pending() == 2
    out = sched.schedule(clock.now(), ctxs)
    assert out.batch.requests == [a, c]
    assert sched.pending() == 0


def test_cancel_after_the_request_is_in_a_batch_is_a_no_op():
    """The caller leaving while its batch runs must not corrupt the queue's live count."""
    sched, ctxs, clock = make()
    a = submit(sched, ctxs, clock, "standard")
    out = sched.schedule(clock.now(), ctxs)
    assert out.batch.requests == [a]
    sched.cancel(a)  # e.g. the gRPC deadline of a's call passed while the batch ran
    assert sched.pending() == 0
    b = submit(sched, ctxs, clock, "standard")
    assert sched.pending() == 1  # the dispatcher only plans while pending() > 0
    assert sched.schedule(clock.now(), ctxs).batch.requests == [b]


def test_retry_requeues_a_dead_workers_batch_once_ahead_of_later_deadlines_and_past_queue_limits():
    sched, ctxs, clock = make()
    first = [submit(sched, ctxs, clock, "interactive") for _ in range(3)]
    batch = sched.schedule(clock.now(), ctxs).batch
    assert batch.requests == first
    clock.advance(0.002)
    later = [submit(sched, ctxs, clock, "interactive") for _ in range(4)]  # the class queue is full (4)
    sched.cancel(first[1])  # its caller left while the batch ran: not run again
    assert sched.retry(batch.requests) == []
    assert sched.pending() == 6
    again = sched.schedule(clock.now(), ctxs).batch
    assert again.requests[:2] == [first[0], first[2]] and again.requests[2:] == later
    assert sched.retry(again.requests) == [first[0], first[2]]  # their one retry is spent
    assert sched.pending() == 4


def test_a_retried_request_that_turned_hopeless_is_expired():
    sched, ctxs, clock = make()
    req = submit(sched, ctxs, clock, "standard")
    batch = sched.schedule(clock.now(), ctxs).batch
    clock.advance(0.01995)  # 0.05 ms left: less than the fastest level's 0.1 ms
    assert sched.retry(batch.requests) == []
    out = sched.schedule(clock.now(), ctxs)
    assert out.batch is None and out.expired == [req]


def test_candidates_not_chosen_are_requeued_in_order():
    ms = np.tile(np.arange(1.0, 65.0), (1, len(LEVELS), 1))  # 1 ms per request at every level
    table = LatencyTable(LEVELS, 64, (), ms, ms.copy())
    sched, ctxs, clock = make(table=table)
    reqs = [submit(sched, ctxs, clock, "standard", budget_ms=3.5) for _ in range(7)]
    first = sched.schedule(clock.now(), ctxs)
    assert first.batch.requests == reqs[:3]
    assert sched.pending() == 4
    second = sched.schedule(clock.now(), ctxs)
    assert second.batch.requests == reqs[3:6]
    third = sched.schedule(clock.now(), ctxs)
    assert third.batch.requests == reqs[6:]
    assert sched.pending() == 0


def test_wait_decision_requeues_every_candidate():
    sched, ctxs, clock = make(policy=WaitPolicy())
    reqs = [submit(sched, ctxs, clock, "standard") for _ in range(3)]
    out = sched.schedule(clock.now(), ctxs)
    assert out.batch is None
    assert out.wake_at_s == pytest.approx(clock.now() + 0.005)
    assert sched.pending() == 3
    sched.policy = SLOAwarePolicy()
    assert sched.schedule(clock.now(), ctxs).batch.requests == reqs


def test_most_urgent_model_goes_first():
    sched, ctxs, clock = make(models=("m1", "m2"))
    later = submit(sched, ctxs, clock, "batch", model="m1")
    sooner = submit(sched, ctxs, clock, "interactive", model="m2")
    out = sched.schedule(clock.now(), ctxs)
    assert out.batch.model == "m2" and out.batch.requests == [sooner]
    out = sched.schedule(clock.now(), ctxs)
    assert out.batch.model == "m1" and out.batch.requests == [later]


def test_batch_respects_context_max_batch():
    sched, ctxs, clock = make()
    for _ in range(10):
        submit(sched, ctxs, clock, "batch")
    ctxs = {"m": replace(ctxs["m"], max_batch=4)}
    assert len(sched.schedule(clock.now(), ctxs).batch.requests) == 4
    assert sched.pending() == 6


def test_update_from_output_reports_whether_deadlines_were_met():
    policy = RecordingPolicy()
    sched, ctxs, clock = make(policy=policy)
    submit(sched, ctxs, clock, "interactive")
    submit(sched, ctxs, clock, "batch")
    batch = sched.schedule(clock.now(), ctxs).batch
    sched.update_from_output(batch, 3.0, clock.now() + 0.010)
    sched.update_from_output(batch, 30.0, clock.now() + 0.030)  # past interactive's 20 ms
    assert policy.observed == [(3.0, True), (30.0, False)]


def test_a_batch_that_ran_slow_makes_the_next_plan_expect_it():
    """The measured exec goes back to slonn's policy (its recent-slowdown factor and margin) through the
    scheduler."""
    policy = SLOAwarePolicy(RecentSlowdown(quantile=0.5, window=1))

    def run_two(exec_ms: float):
        for _ in range(2):
            submit(sched, ctxs, clock, "standard")
        batch = sched.schedule(clock.now(), ctxs).batch
        sched.update_from_output(batch, exec_ms, clock.now() + exec_ms * 1e-3)
        clock.advance(exec_ms * 1e-3)
        return batch.plan

    sched, ctxs, clock = make(policy=policy)
    first = run_two(8.0)  # 4x the table
    assert first.speed == 1.0 and first.table_mean_ms == pytest.approx(2.0)  # 2 requests at level 1.0
    second = run_two(8.0)
    assert second.speed > 1.5
    # one batch is too few to know the factor's error margin: the plan is still bounded by the table
    assert second.predicted_ms == pytest.approx(TABLE.safe(0, 0, second.count))
    for _ in range(8):
        plan = run_two(8.0)
    assert policy.recent.margin() >= 1.0
    assert plan.speed > 1.5 and plan.predicted_ms == pytest.approx(plan.speed * plan.table_mean_ms
                                                                    * policy.recent.margin())


def test_drain_returns_every_queued_request():
    sched, ctxs, clock = make()
    reqs = {submit(sched, ctxs, clock, c) for c in ("interactive", "standard", "batch", "batch")}
    assert set(sched.drain()) == reqs
    assert sched.pending() == 0


def test_fake_clock_moves_only_forward():
    clock = FakeClock(5.0)
    clock.advance(0.5)
    clock.set(6.0)
    assert clock.now() == 6.0
    with pytest.raises(ValueError):
        clock.advance(-1)
    with pytest.raises(ValueError):
        clock.set(1.0)


def test_hard_requests_behind_a_late_head_of_a_serve_class_are_expired_not_batched():
    sched, ctxs, clock = make()
    late_head = submit(sched, ctxs, clock, "batch", budget_ms=0.05)  # soft: served late
    hard = sched.make_request("m", "batch", clock.now(), budget_ms=0.5, hard=True)
    sched.add_request(hard, clock.now(), ctxs["m"])
    clock.advance(0.002)  # both past their deadlines
    out = sched.schedule(clock.now(), ctxs)
    assert [r is hard for r in out.expired] == [True]
    assert out.batch is not None and out.batch.requests == [late_head] and out.batch.plan.late
    assert sched.pending() == 0


@pytest.mark.parametrize("name", ["triton:max_delay_ms=5", "triton:preferred=4/6,max_delay_ms=3",
                                  "fixed:0.25,max_delay_ms=2,max_batch=6", "triton:max_delay_ms=0"])
@pytest.mark.parametrize("models", [("m",), ("m", "n")])
@pytest.mark.parametrize("hard_share", [0.0, 0.05])
def test_asking_whether_to_wait_before_popping_decides_as_popping_does(name, models, hard_share):
    """Random arrivals, cancellations and schedule calls over three classes (and two models; and callers'
    hard deadlines, which turn the pre-check off once a late-serving class holds one): the scheduler that asks
    the policy's ``wait_until`` first makes every decision the popping path makes, batch for batch."""
    runs = []
    for policy in (make_baseline(name), WrappedPolicy(make_baseline(name))):
        assert policy.may_wait is not isinstance(policy, WrappedPolicy)
        rng = random.Random(7)
        sched, ctxs, clock = make(policy, models=models, max_batch=8)
        queued, trace = [], []
        for _ in range(600):
            clock.advance(rng.expovariate(1500.0))
            for _ in range(rng.choice((0, 0, 1, 1, 2, 7))):
                model, cls = rng.choice(models), rng.choice(("interactive", "standard", "batch"))
                hard = rng.random() < hard_share
                req = sched.make_request(model, cls, clock.now(), budget_ms=rng.uniform(5, 30) if hard else None,
                                         hard=hard)
                try:
                    sched.add_request(req, clock.now(), ctxs[model])
                    queued.append(req)
                except QueueFull:
                    trace.append("queue full")
            if queued and rng.random() < 0.1:
                sched.cancel(queued[rng.randrange(len(queued))])
            out = sched.schedule(clock.now(), ctxs)
            batch = out.batch
            trace.append((out.wake_at_s, [r.pending.seq for r in out.expired],
                           None if batch is None else ([r.pending.seq for r in batch.requests], batch.plan)))
        runs.append(trace)
    assert runs[0] == runs[1]
    decisions = [t for t in runs[0] if t != "queue full"]
    assert any(t[2] is not None for t in decisions)  # the run formed batches ...
    if not name.endswith("max_delay_ms=0"):
        assert any(t[0] is not None for t in decisions)  # ... and waited
