"""The driver on its own: pure calls with the time passed in, no event loop, no pool."""

from __future__ import annotations

import math

import pytest

from slonn.policy.planner import SLOAwarePolicy, Wait
from slonn.policy.table import LatencyTable
from slonn.scheduler.config import SLOClassConfig
from slonn.scheduler.core import Batch, Scheduler
from slonn.scheduler.driver import OVERHEAD_REFIT_EVERY, OVERHEAD_STALE_S, Driver, caller_budget
from slonn.scheduler.errors import DeadlineUnreachable, QueueFull
from tests.fakes import WrappedPolicy

LEVELS = (1.0, 0.5, 0.1)
ACC = (0.97, 0.96, 0.95)
CLASSES = {
    "slow": SLOClassConfig("slow", latency_ms=10_000, min_accuracy=0.9, max_queue=1000, on_late="serve"),
    "tight": SLOClassConfig("tight", latency_ms=10, min_accuracy=0.9),
}
TABLE = LatencyTable.constant(LEVELS, 16, per_item_ms=0.1, fixed_ms=1.0)  # fastest level, batch 1: 1.01 ms


def make(policy=None, max_batch: int = 16, overhead_ms: float = 0.0, max_inflight: int = 8192) -> Driver:
    scheduler = Scheduler({"m": ACC}, CLASSES, policy or SLOAwarePolicy())
    return Driver(scheduler, {"m": TABLE}, {"m": ACC}, max_batch, overhead_ms, workers=2, max_inflight=max_inflight)


def ids(batch: Batch) -> list[int]:
    return [r.handle for r in batch.requests]


def test_one_batch_per_idle_worker_and_the_rest_waits_for_the_next_call():
    d = make(max_batch=2)
    for k in range(5):
        d.admit("m", "slow", 0.0, handle=k)
    out = d.next_batches(2, 0.001)
    assert [ids(b) for b in out.batches] == [[0, 1], [2, 3]]
    assert all(b.planned_at_s == 0.001 for b in out.batches)
    assert d.scheduler.pending() == 1 and out.expired == []
    assert out.wake_at_s is None  # a serve-late request never expires: only an event wakes the loop
    assert [ids(b) for b in d.next_batches(1, 0.002).batches] == [[4]]


def test_with_no_idle_worker_a_hopeless_request_is_answered_early_and_the_wake_up_says_when():
    d = make()
    req = d.admit("m", "tight", 0.0, handle=1)
    out = d.next_batches(0, 0.0)
    assert out.batches == [] and out.expired == []
    turns_hopeless_s = req.pending.deadline_s - TABLE.mean(0, len(LEVELS) - 1, 1) * 1e-3
    assert out.wake_at_s == pytest.approx(turns_hopeless_s)
    assert d.next_batches(0, out.wake_at_s).expired == []  # at that instant it can still just make it
    later = math.nextafter(out.wake_at_s, math.inf)
    assert d.next_batches(0, later).expired == [req] and d.scheduler.pending() == 0


def test_the_wake_up_is_always_after_now():
    d = make()
    req = d.admit("m", "tight", 0.0, handle=1)
    exact = d.next_batches(0, 0.0).wake_at_s
    out = d.next_batches(0, exact)  # the head is due to turn hopeless right now
    assert out.wake_at_s is not None and out.wake_at_s > exact and req.queued


def test_admission_counts_requests_in_flight_until_each_is_released():
    d = make(max_inflight=2)
    d.admit("m", "slow", 0.0, handle=0)
    d.admit("m", "slow", 0.0, handle=1)
    with pytest.raises(QueueFull, match="max_inflight=2"):
        d.admit("m", "slow", 0.0, handle=2)
    d.release()
    d.admit("m", "slow", 0.0, handle=3)
    assert d.inflight == 2 and d.scheduler.pending() == 3


def test_a_hard_caller_deadline_binds_and_expires_early_even_in_a_serve_late_class():
    d = make()
    budget_ms, hard = caller_budget(0.0, 20.0)
    req = d.admit("m", "slow", 0.0, handle=0, budget_ms=budget_ms, hard=hard)
    assert req.pending.deadline_s == pytest.approx(0.020) and req.pending.on_late == "reject"
    assert d.next_batches(0, 0.0195).expired == [req]


@pytest.mark.parametrize(("budget_ms", "time_left_ms", "expected"), [
    (0.0, None, (0.0, False)),  # no caller deadline: the class's
    (30.0, None, (30.0, False)),
    (0.0, 80.0, (80.0, True)),  # the caller's deadline is the only one given
    (30.0, 80.0, (30.0, False)),  # the request's budget is tighter: the class's on_late applies
    (100.0, 80.0, (80.0, True)),
])
def test_caller_budget_takes_the_tighter_deadline(budget_ms, time_left_ms, expected):
    assert caller_budget(budget_ms, time_left_ms) == expected


def test_caller_budget_refuses_a_call_with_too_little_time_left():
    with pytest.raises(DeadlineUnreachable, match="deadline leaves 4.0 ms"):
        caller_budget(0.0, 4.0)
    assert caller_budget(0.0, 4.0, margin_ms=0.0) == (4.0, True)


def test_a_dead_workers_requests_are_queued_once_more_then_failed():
    d = make()
    for k in range(3):
        d.admit("m", "slow", 0.0, handle=k)
    batch = d.next_batches(1, 0.0).batches[0]
    requeued, failed = d.on_worker_died(batch.requests)
    assert requeued == batch.requests and failed == [] and d.scheduler.pending() == 3
    again = d.next_batches(1, 0.01).batches[0]
    assert ids(again) == [0, 1, 2]
    requeued, failed = d.on_worker_died(again.requests)
    assert requeued == [] and failed == again.requests and d.scheduler.pending() == 0


def test_after_stop_a_worker_death_queues_nothing_again():
    d = make()
    d.admit("m", "slow", 0.0, handle=0)
    d.admit("m", "slow", 0.0, handle=1)
    batch = d.next_batches(1, 0.0).batches[0]
    d.admit("m", "slow", 0.0, handle=2)
    assert [r.handle for r in d.stop()] == [2]
    assert d.on_worker_died(batch.requests) == ([], batch.requests) and d.scheduler.pending() == 0


def run_batches(d: Driver, n: int, overhead_ms: float, now: float = 0.0, exec_ms: float = 1.0) -> float:
    """``n`` batches of one, each done ``exec_ms + overhead_ms`` after it was planned; returns the time."""
    for k in range(n):
        d.admit("m", "slow", now, handle=k)
        batch = d.next_batches(1, now).batches[0]
        now += (exec_ms + overhead_ms) * 1e-3
        d.release()
        d.on_batch_done(batch, exec_ms, now)
    return now


def test_the_overhead_allowance_is_learned_from_finished_batches_and_planned_with():
    d = make(overhead_ms=0.5)
    now = run_batches(d, OVERHEAD_REFIT_EVERY - 1, overhead_ms=3.0)
    assert d.overhead_ms == 0.5  # estimated every OVERHEAD_REFIT_EVERY batches
    now = run_batches(d, 1, overhead_ms=3.0, now=now)
    assert d.overhead_ms == pytest.approx(3.0)
    assert d.contexts(now)["m"].overhead_ms == d.overhead_ms
    run_batches(d, OVERHEAD_REFIT_EVERY, overhead_ms=0.1, now=now)
    assert d.overhead_ms == pytest.approx(3.0)  # the 95th percentile of the window remembers the slow ones


def test_a_raised_allowance_decays_only_while_admission_refuses():
    d = make(overhead_ms=0.5)
    d.overhead_ms = 9.5  # as if learned under contention: a tight request (10 ms) no longer fits
    assert d.contexts(10.0)["m"].overhead_ms == 9.5  # idle and refusing nobody: kept
    with pytest.raises(DeadlineUnreachable):
        d.admit("m", "tight", 10.0)
    assert d.contexts(10.0 + OVERHEAD_STALE_S)["m"].overhead_ms == 9.5
    assert d.contexts(10.0 + 1.01 * OVERHEAD_STALE_S)["m"].overhead_ms == 4.75
    d.admit("m", "tight", 10.0 + 1.02 * OVERHEAD_STALE_S)  # fits again


class FailingPolicy(WrappedPolicy):
    """The real policy, whose ``plan`` raises from its ``fail_at``-th call on."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.calls = 0
        self.fail_at = fail_at

    def plan(self, candidates, now_s, ctx):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise RuntimeError("a bad decision")
        return super().plan(candidates, now_s, ctx)


def test_a_round_that_raises_part_way_puts_back_what_it_had_planned():
    d = make(FailingPolicy(fail_at=2), max_batch=2)
    for k in range(5):
        d.admit("m", "slow", 0.0, handle=k)
    with pytest.raises(RuntimeError, match="a bad decision"):
        d.next_batches(3, 0.0)  # the first batch is planned, the second decision raises
    assert d.scheduler.pending() == 5
    assert sorted(r.handle for r in d.drain()) == [0, 1, 2, 3, 4]


def test_the_allowance_is_numpys_95th_percentile_of_the_last_window_of_batches():
    import numpy as np

    from slonn.scheduler.driver import OVERHEAD_WINDOW

    rng = np.random.default_rng(3)
    d = make(overhead_ms=0.0)
    seen: list[float] = []
    now = 0.0
    for n in range(3 * OVERHEAD_WINDOW + 5):
        ms = float(rng.choice([rng.exponential(2.0), 1.0, 4.0]))  # ties too
        d.admit("m", "slow", now, handle=n)
        batch = d.next_batches(1, now).batches[0]
        done = now + (1.0 + ms) * 1e-3
        d.release()
        d.on_batch_done(batch, 1.0, done)
        seen.append((done - batch.planned_at_s) * 1e3 - 1.0)  # what the driver measures
        now = done
        if (n + 1) % OVERHEAD_REFIT_EVERY == 0:
            assert d.overhead_ms == float(np.percentile(seen[-OVERHEAD_WINDOW:], 95))


def test_a_wait_ends_early_for_a_head_that_turns_hopeless_first():
    """The policy waits 5 s; a queued request of a class that rejects late answers can no longer make its
    10 ms deadline well before that: the driver looks again when it turns hopeless, to answer it then."""

    class LongWait(WrappedPolicy):
        def plan(self, candidates, now_s, ctx):
            return Wait(now_s + 5.0)

    d = make(LongWait())
    req = d.admit("m", "tight", 0.0)
    out = d.next_batches(1, 0.001)
    assert out.batches == [] and d.scheduler.pending() == 1
    assert out.wake_at_s == pytest.approx(req.pending.deadline_s - TABLE.mean(0, 2, 1) * 1e-3)
    assert d.next_batches(1, out.wake_at_s + 1e-6).expired == [req]
