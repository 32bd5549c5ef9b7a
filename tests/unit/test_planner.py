"""SLOAwarePolicy: pure decisions on explicit ``now_s`` and hand-made latency tables."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slonn.policy.planner import RECENT_REFRESH, Pending, Plan, PlanContext, RecentSlowdown, SLOAwarePolicy, edf_key, \
    fastest_allowed
from slonn.policy.table import LatencyTable

LEVELS = (1.0, 0.5, 0.25, 0.1)
ACCURACY = (0.99, 0.97, 0.95, 0.90)
NOW = 100.0
POLICY = SLOAwarePolicy()

# latency = 1 ms * batch * level: level 1.0 runs 10 requests in 10 ms, level 0.1 runs 100.
TABLE = LatencyTable.constant(LEVELS, max_batch=64, per_item_ms=1.0)
_seq = itertools.count()


def ctx(table: LatencyTable = TABLE, max_batch: int = 64, overhead_ms: float = 0.0, bucket: int = 0) -> PlanContext:
    return PlanContext(table, bucket, ACCURACY, max_batch, overhead_ms)


def pend(slack_ms: float, floor: float = 0.0, mode: str = "latency", on_late: str = "reject",
         priority: int = 1) -> Pending:
    return Pending(next(_seq), NOW - 0.001, NOW + slack_ms * 1e-3, floor, priority, mode, on_late)


def batch(n: int, slack_ms: float, **kw) -> list[Pending]:
    return [pend(slack_ms, **kw) for _ in range(n)]


def test_small_batch_with_slack_runs_dense():
    plan = POLICY.plan(batch(8, slack_ms=10.6), NOW, ctx())
    assert isinstance(plan, Plan)
    assert (plan.count, plan.level, plan.late) == (8, 1.0, False)
    assert plan.predicted_ms == pytest.approx(8.0)


def test_largest_feasible_batch_first_then_most_accurate_level():
    # In 10.6 ms: level 1.0 fits 10, 0.5 fits 21, 0.25 and 0.1 fit all 30. Batch 30 wins; 0.25 is the
    # most accurate level that runs it.
    plan = POLICY.plan(batch(30, slack_ms=10.6), NOW, ctx())
    assert (plan.count, plan.level) == (30, 0.25)
    assert plan.predicted_ms == pytest.approx(7.5)
    assert plan.predicted_ms == TABLE.safe(0, TABLE.level_index(0.25), 30)


def test_batch_limited_by_deadline_when_no_level_fits_all():
    # 150 requests but max_batch 64; in 5.05 ms level 0.1 runs 50 (5 ms), nothing runs more.
    plan = POLICY.plan(batch(150, slack_ms=5.05), NOW, ctx())
    assert (plan.count, plan.level) == (50, 0.1)


def test_max_batch_caps_the_batch():
    plan = POLICY.plan(batch(30, slack_ms=1000), NOW, ctx(max_batch=4))
    assert (plan.count, plan.level) == (4, 1.0)


def test_overhead_counts_against_the_deadline():
    # 8 at level 1.0 is 8 ms; with 3 ms overhead only 7 ms are left -> 0.5 (4 ms + 3 ms <= 7.5 ms).
    plan = POLICY.plan(batch(8, slack_ms=7.5), NOW, ctx(overhead_ms=3.0))
    assert (plan.count, plan.level) == (8, 0.5)


def test_earliest_deadline_of_the_batch_binds():
    # The head has 2.4 ms, the others plenty: for the head, 1.0 runs 2, 0.5 runs 4, 0.25 runs 9 and
    # only 0.1 runs all 10 (1 ms).
    candidates = [pend(2.4)] + batch(9, slack_ms=1000)
    plan = POLICY.plan(candidates, NOW, ctx())
    assert (plan.count, plan.level) == (10, 0.1)


@pytest.mark.parametrize(("floor", "expected"), [(0.0, 0.1), (0.95, 0.25), (0.97, 0.5), (0.99, 1.0)])
def test_accuracy_mode_picks_fastest_level_meeting_the_floor(floor, expected):
    plan = POLICY.plan(batch(8, slack_ms=1000, floor=floor, mode="accuracy"), NOW, ctx())
    assert (plan.count, plan.level) == (8, expected)


def test_latency_mode_with_same_floor_picks_most_accurate_level():
    plan = POLICY.plan(batch(8, slack_ms=1000, floor=0.95, mode="latency"), NOW, ctx())
    assert (plan.count, plan.level) == (8, 1.0)


def test_latency_mode_breaks_accuracy_ties_toward_the_faster_level():
    # Levels 1.0, 0.5 and 0.25 equally accurate (as on the digits model): no reason to run dense.
    tied = PlanContext(TABLE, 0, (0.98, 0.98, 0.98, 0.90), 64, 0.0)
    plan = POLICY.plan(batch(8, slack_ms=1000, mode="latency"), NOW, tied)
    assert (plan.count, plan.level) == (8, 0.25)
    # A strictly more accurate level still wins over a faster one.
    plan = POLICY.plan(batch(8, slack_ms=1000, mode="latency"), NOW, ctx())
    assert plan.level == 1.0


def test_accuracy_mode_uses_the_table_not_the_level_to_judge_speed():
    # A table where level 0.1 is slower than 0.25 (say, kernel overheads): the floor allows both, 0.25 wins.
    safe = np.array([[[5.0] * 8, [4.0] * 8, [1.0] * 8, [2.0] * 8]])
    table = LatencyTable(LEVELS, 8, (), safe, safe.copy())
    plan = POLICY.plan(batch(4, slack_ms=1000, mode="accuracy"), NOW, ctx(table=table))
    assert plan.level == 0.25


def test_floor_caps_the_batch_when_no_level_meets_both():
    # In 1.6 ms level 1.0 (the only level meeting C's 0.98 floor) runs just 1 request;
    # the others run 2 or more but C's floor excludes them from C on: C and D stay queued.
    a, b, c, d = pend(1.6, 0.90), pend(1.7, 0.90), pend(1.8, 0.98), pend(1.9, 0.90)
    plan = POLICY.plan([a, b, c, d], NOW, ctx())
    assert (plan.count, plan.level) == (2, 0.5)


def test_floor_does_not_cap_when_a_level_meets_floor_and_deadline():
    a, b, c, d = pend(100, 0.90), pend(101, 0.90), pend(102, 0.98), pend(103, 0.90)
    plan = POLICY.plan([a, b, c, d], NOW, ctx())
    assert (plan.count, plan.level) == (4, 1.0)


@pytest.mark.parametrize(("slack_ms", "floor", "overhead_ms", "hopeless"), [
    (0.2, 0.95, 0.0, True),     # fastest allowed level is 0.25: 0.25 ms > 0.2 ms
    (0.3, 0.95, 0.0, False),
    (0.3, 0.95, 0.1, True),     # overhead counts
    (0.2, 0.0, 0.0, False),     # no floor: level 0.1 runs one request in 0.1 ms
    (0.9, 0.999, 0.0, True),    # no level meets the floor: judged at the most accurate (1.0 -> 1 ms)
    (1.1, 0.999, 0.0, False),
    (-5.0, 0.0, 0.0, True),     # already past its deadline
])
def test_is_hopeless(slack_ms, floor, overhead_ms, hopeless):
    assert POLICY.is_hopeless(pend(slack_ms, floor), NOW, ctx(overhead_ms=overhead_ms)) is hopeless


def test_hopeless_means_the_expected_run_misses_not_the_safe_bound():
    # safe = 10x mean: a request whose slack lies between them may still make it, so it is planned
    # (at the fastest allowed level, as a late-risk batch), not turned away.
    noisy = LatencyTable(LEVELS, 64, (), TABLE.safe_ms * 10, TABLE.mean_ms.copy())
    between = pend(1.0, floor=0.95)  # fastest allowed: 0.25 -> mean 0.25 ms, safe 2.5 ms
    assert not POLICY.is_hopeless(between, NOW, ctx(noisy))
    plan = POLICY.plan([between], NOW, ctx(noisy))
    assert (plan.count, plan.level) == (1, 0.25)
    assert POLICY.is_hopeless(pend(0.2, floor=0.95), NOW, ctx(noisy))  # even the expected run misses


def test_fastest_allowed_falls_back_to_most_accurate():
    assert LEVELS[fastest_allowed(0.0, ctx())] == 0.1
    assert LEVELS[fastest_allowed(0.96, ctx())] == 0.5
    assert LEVELS[fastest_allowed(1.0, ctx())] == 1.0


def test_late_plan_when_the_head_cannot_make_it():
    head = pend(-1.0, floor=0.95, on_late="serve")
    rest = [pend(50, floor=0.90, on_late="serve"), pend(60, floor=0.97, on_late="serve")]
    plan = POLICY.plan([head, *rest], NOW, ctx())
    # Fastest level meeting the head's floor, batched with the followers whose floor that level meets.
    assert plan.late
    assert (plan.count, plan.level) == (2, 0.25)
    assert plan.predicted_ms == pytest.approx(0.5)
    assert "late" in plan.reason


def test_late_plan_runs_at_least_the_head():
    head = pend(-1.0, floor=0.999, on_late="serve")  # no level meets its floor
    plan = POLICY.plan([head, pend(50)], NOW, ctx())
    assert plan.late and plan.count == 1 and plan.level == 1.0


@pytest.mark.parametrize("overhead_ms", [0.0, 0.5])
def test_a_late_head_takes_along_only_followers_the_batch_does_not_make_late(overhead_ms):
    # The head cannot make it even alone (0.05 ms left after the overhead, 0.1 ms at level 0.1). The next
    # request can in its own 3 ms, and the 62 after it in 50 ms: at level 0.1 the batch stops where it would
    # make the second late (30 requests, 3 ms), instead of taking all 64 along (6.4 ms).
    candidates = [pend(0.05 + overhead_ms), pend(3.0 + overhead_ms)] + batch(62, slack_ms=50 + overhead_ms)
    plan = POLICY.plan(candidates, NOW, ctx(overhead_ms=overhead_ms))
    assert plan.late and plan.level == 0.1
    assert plan.count == 30 and plan.predicted_ms == pytest.approx(3.0)


def test_a_late_head_leaves_a_follower_the_next_batch_serves_in_time():
    # A kernel switch makes level 0.1 jump from 0.2 ms at batch 2 to 5 ms at batch 3. The second request
    # (0.15 ms left) is late wherever it runs and joins the head; the third (1 ms left) would be late in this
    # batch but runs in time next (0.2 + 0.1 ms), so the batch stops before it.
    safe = TABLE.safe_ms.copy()
    safe[0, 3, 2:] = 5.0 + 0.1 * np.arange(62)
    table = LatencyTable(LEVELS, 64, (), safe, safe.copy())
    plan = POLICY.plan([pend(0.05), pend(0.15), pend(1.0), pend(1.0)], NOW, ctx(table=table))
    assert plan.late and (plan.count, plan.level) == (2, 0.1)


def test_a_backlog_of_late_requests_is_caught_up_in_full_batches():
    candidates = batch(40, slack_ms=-1.0, on_late="serve") + batch(30, slack_ms=1.0, on_late="serve")
    plan = POLICY.plan(candidates, NOW, ctx())
    # The 40 are late whatever runs; the batch of 40 at 0.1 takes 4 ms, so the others (1 ms) are late
    # alone too, past 0.1 ms each: none of them caps it.
    assert plan.late and (plan.count, plan.level) == (64, 0.1)


def test_contention_bucket_selects_the_table_row():
    fast = TABLE.safe_ms[0]
    safe = np.stack([fast, fast * 10])
    table = LatencyTable(LEVELS, 64, (0.5,), safe, safe.copy())
    assert (table.bucket(0.2), table.bucket(0.5), table.bucket(0.7)) == (0, 0, 1)
    quiet = POLICY.plan(batch(8, slack_ms=10.6), NOW, ctx(table=table, bucket=0))
    busy = POLICY.plan(batch(8, slack_ms=10.6), NOW, ctx(table=table, bucket=1))
    assert (quiet.count, quiet.level) == (8, 1.0)
    assert (busy.count, busy.level) == (8, 0.1)  # 8 x 0.1 x 10 = 8 ms; 0.25 would be 20 ms


def test_plan_needs_a_candidate():
    with pytest.raises(ValueError):
        POLICY.plan([], NOW, ctx())


def test_edf_key_orders_by_deadline_priority_seq():
    a = Pending(5, 0.0, 1.0, 0.0, 2, "latency", "reject")
    b = Pending(6, 0.0, 1.0, 0.0, 0, "latency", "reject")
    c = Pending(7, 0.0, 0.5, 0.0, 9, "latency", "reject")
    d = Pending(8, 0.0, 1.0, 0.0, 0, "latency", "reject")
    assert sorted([a, b, c, d], key=edf_key) == [c, b, d, a]


def test_latency_table_validates_shape_and_level_order():
    ms = np.ones((1, 2, 4))
    with pytest.raises(ValueError, match="safe_ms has shape"):
        LatencyTable((1.0, 0.5), 3, (), ms, ms)
    with pytest.raises(ValueError, match="most accurate"):
        LatencyTable((0.5, 1.0), 4, (), ms, ms)


# -- property: the plan is the largest feasible batch, at the most accurate feasible level -------------

candidate = st.tuples(st.floats(-2.0, 40.0), st.sampled_from([0.0, 0.9, 0.95, 0.97, 0.99]))


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(raw=st.lists(candidate, min_size=1, max_size=40), max_batch=st.integers(1, 32),
       overhead_ms=st.sampled_from([0.0, 0.5]))
def test_plan_matches_brute_force(raw, max_batch, overhead_ms):
    c = ctx(max_batch=max_batch, overhead_ms=overhead_ms)
    cands = sorted((pend(slack, floor, on_late="serve") for slack, floor in raw), key=edf_key)
    plan = POLICY.plan(cands, NOW, c)
    feasible = {}  # n -> levels feasible for the first n
    for n in range(1, min(len(cands), max_batch) + 1):
        floor = max(p.min_accuracy for p in cands[:n])
        deadline = min(p.deadline_s for p in cands[:n])
        # In the planner's arithmetic (ms left, less the overhead): on a boundary such as 1.5 ms needed with
        # 1.5 ms left, seconds and milliseconds round differently.
        ok = [i for i in range(len(LEVELS)) if ACCURACY[i] >= floor
              and TABLE.safe(0, i, n) <= (deadline - NOW) * 1e3 - overhead_ms]
        if ok:
            feasible[n] = ok
    assert 1 <= plan.count <= min(len(cands), max_batch)
    if not feasible:
        assert plan.late
        return
    best_n = max(feasible)
    assert not plan.late
    assert plan.count == best_n
    assert plan.level == LEVELS[min(feasible[best_n])]  # lowest index = most accurate
    assert plan.predicted_ms == TABLE.safe(0, LEVELS.index(plan.level), plan.count)


def policy_at_speed(speed: float) -> SLOAwarePolicy:
    """A policy whose recent batches ran ``speed`` times the table's mean, just now, as its factor expected (a
    negligible prior; the margin is the median of the last batch's error, here exactly 1)."""
    policy = SLOAwarePolicy(RecentSlowdown(tau_s=1.0, prior=1e-12, max_factor=4.0, quantile=0.5, window=1))
    for _ in range(RECENT_REFRESH):
        policy.observe(Plan(1, 1.0, 1.0, table_mean_ms=1.0, speed=speed), speed, True, NOW)
    assert policy.recent.margin() == 1.0
    return policy


@settings(max_examples=200)
@given(slack=st.floats(-5.0, 20.0), floor=st.sampled_from([0.0, 0.9, 0.95, 0.97, 0.99, 1.0]),
       mode=st.sampled_from(["latency", "accuracy"]), overhead_ms=st.sampled_from([0.0, 0.5]),
       speed=st.sampled_from([1.0, 0.7, 1.6]))
def test_one_candidate_shortcut_equals_the_general_path(slack, floor, mode, overhead_ms, speed):
    c = ctx(overhead_ms=overhead_ms)
    p = [pend(slack, floor, mode=mode, on_late="serve")]
    rows = TABLE.mean_rows(0)
    policy = policy_at_speed(speed)
    f = policy.recent.factor(NOW)
    assert f == pytest.approx(speed)
    assert policy._plan_one(p, NOW, c, rows, f, f) == policy._plan_prefixes(p, 1, NOW, c, rows, f, f) \
        == policy.plan(p, NOW, c)


# --------------------------------------------------------------------------- recent slowdown


def test_recent_slowdown_starts_at_one_and_moves_half_way_on_one_batch():
    r = RecentSlowdown(tau_s=0.1, prior=1.0)
    assert r.factor(0.0) == 1.0
    r.observe(0.0, 2.0, 1.0)  # ran twice the table's mean
    assert r.factor(0.0) == pytest.approx(2.0 ** 0.5)  # log-mean 0.69 over weights 1 (batch) + 1 (prior)
    r.observe(0.0, 2.0, 1.0)
    assert r.factor(0.0) == pytest.approx(2.0 ** (2 / 3))


def test_recent_slowdown_forgets_with_time():
    r = RecentSlowdown(tau_s=0.1, prior=1.0)
    for i in range(20):
        r.observe(i * 0.01, 0.5, 1.0)  # batches ran at half the table's mean
    assert r.factor(0.19) < 0.6
    assert r.factor(0.19) < r.factor(0.29) < r.factor(0.49) < 1.0
    assert r.factor(2.0) == pytest.approx(1.0, abs=1e-6)


def test_recent_slowdown_is_clamped_ignores_missing_means_and_turns_off():
    r = RecentSlowdown(tau_s=0.1, prior=1.0, max_factor=2.0)
    for _ in range(10):
        r.observe(1.0, 100.0, 1.0)  # a stall: 100x the table
    assert r.factor(1.0) == 2.0
    for _ in range(100):
        r.observe(1.0, 0.01, 1.0)
    assert r.factor(1.0) == 0.5
    quiet = RecentSlowdown()
    quiet.observe(1.0, 5.0, float("nan"))  # a plan without a table mean (a baseline's)
    quiet.observe(1.0, float("nan"), 1.0)
    assert quiet.factor(1.0) == 1.0
    off = RecentSlowdown(tau_s=0.0)
    off.observe(1.0, 5.0, 1.0)
    assert off.factor(1.0) == 1.0
    stuck = RecentSlowdown(tau_s=0.1)
    stuck.observe(1.0, float("inf"), 1.0)  # an infinite ratio would stay in the sum for good
    stuck.observe(1.0, 1.0, 1e-320)
    assert stuck.factor(1.0) == 1.0 and stuck.factor(100.0) == 1.0
    for bad in ({"tau_s": -1.0}, {"tau_s": float("inf")}, {"prior": 0.0}, {"max_factor": 0.5},
                {"max_factor": float("inf")}, {"quantile": 1.0}, {"quantile": 0.0}, {"window": 0},
                {"window": 98}, {"quantile": 0.999}):  # the 99th (99.9th) percentile of 98 (256) is unknowable
        with pytest.raises(ValueError):
            RecentSlowdown(**bad)


def test_a_slow_recent_batch_shrinks_the_plan_and_scales_its_predictions():
    # 10.7 ms: at the table's speed level 0.1 runs all 60 (level 0.25 only 42); at twice the table's
    # latency the largest batch any level fits is 0.1 x 53 (predicted 2 x 5.3 = 10.6 ms).
    cands = batch(60, slack_ms=10.7)
    assert (POLICY.plan(cands, NOW, ctx()).count, POLICY.plan(cands, NOW, ctx()).level) == (60, 0.1)
    slow = policy_at_speed(2.0)
    plan = slow.plan(cands, NOW, ctx())
    assert (plan.count, plan.level) == (53, 0.1)
    assert plan.speed == pytest.approx(2.0)
    assert plan.table_mean_ms == TABLE.mean(0, TABLE.level_index(0.1), 53)
    assert plan.predicted_ms == pytest.approx(2.0 * TABLE.mean(0, TABLE.level_index(0.1), 53))
    assert plan.slack_ms == pytest.approx(10.7)
    fast = policy_at_speed(0.5).plan(batch(8, slack_ms=10.6), NOW, ctx())
    assert (fast.count, fast.level) == (8, 1.0) and fast.predicted_ms == pytest.approx(4.0)


def test_a_slow_recent_batch_makes_the_head_late_but_not_hopeless():
    """Batch and level choice read the recent factor; early drop judges the table's mean alone."""
    slow = policy_at_speed(3.0)
    head = pend(0.2)  # 0.2 ms: level 0.1 alone takes 0.1 ms at the table's speed, 0.3 at 3x
    assert not slow.is_hopeless(head, NOW, ctx())
    plan = slow.plan([head], NOW, ctx())
    assert plan.late and plan.level == 0.1
    assert not POLICY.plan([pend(0.2)], NOW, ctx()).late


def test_the_margin_is_the_conformal_quantile_of_the_factors_own_errors():
    r = RecentSlowdown(tau_s=1.0, quantile=0.9, window=20)
    errors = [0.01 * k for k in range(24)]  # log(measured / (table mean x factor)): 0.00 .. 0.23
    for k, e in enumerate(errors):
        r.observe(NOW, 1.5 * math.exp(e), 1.0, factor=1.5)
        if k + 1 < 16:  # the rank ceil(0.9 (n + 1)) <= n exists from 9 on; recomputed every 8, so first at 16
            assert r.margin() == 0.0
    # the window holds the last 20 errors (0.04 .. 0.23); the 19th of them in order is 0.22
    assert r.margin() == pytest.approx(math.exp(0.22))
    fast = RecentSlowdown(tau_s=1.0, quantile=0.5, window=8)
    for _ in range(8):
        fast.observe(NOW, 0.5, 1.0, factor=1.0)  # faster than expected: the margin never goes below 1
    assert fast.margin() == 1.0
    off = RecentSlowdown(tau_s=0.0, quantile=0.5, window=1)
    for _ in range(8):
        off.observe(NOW, 2.0, 1.0)
    assert off.margin() == 0.0


def test_the_factor_plans_only_once_its_margin_is_known():
    """Until its margin is known the factor plans on the table's safe bound, unscaled (safe x factor counts
    slowdowns twice)."""
    table = LatencyTable(LEVELS, 64, (), TABLE.mean_ms * 1.5, TABLE.mean_ms.copy())  # safe = 1.5 x mean
    policy = SLOAwarePolicy(RecentSlowdown(tau_s=1.0, prior=1e-12, quantile=0.5, window=4))
    policy.observe(Plan(1, 1.0, 1.0, table_mean_ms=1.0), 2.0, True, NOW)
    plan = policy.plan(batch(8, slack_ms=50.0), NOW, ctx(table))
    assert plan.speed == pytest.approx(2.0) and policy.recent.margin() == 0.0
    assert (plan.count, plan.level) == (8, 1.0) and plan.predicted_ms == pytest.approx(12.0)  # 1.5 x 8 ms
    for _ in range(RECENT_REFRESH):  # batches that ran 1.2x what the factor said
        policy.observe(Plan(1, 1.0, 1.0, table_mean_ms=1.0, speed=2.0), 2.4, True, NOW)
    f, m = policy.recent.factor(NOW), policy.recent.margin()
    assert m == pytest.approx(1.2)
    plan = policy.plan(batch(8, slack_ms=50.0), NOW, ctx(table))
    assert plan.speed == pytest.approx(f) and plan.predicted_ms == pytest.approx(8.0 * f * m)


def test_the_default_policy_plans_without_the_factor():
    policy = SLOAwarePolicy()
    first = policy.plan(batch(4, slack_ms=50.0), NOW, ctx())
    policy.observe(first, 12.0, True, NOW)  # 3x the table's mean
    assert policy.plan(batch(4, slack_ms=50.0), NOW, ctx()).speed == 1.0


def test_observe_feeds_the_measured_exec_into_the_next_plan():
    policy = SLOAwarePolicy(RecentSlowdown(tau_s=1.0, prior=1.0))
    plan = policy.plan(batch(4, slack_ms=50.0), NOW, ctx())
    assert plan.table_mean_ms == pytest.approx(4.0) and plan.speed == 1.0
    policy.observe(plan, 12.0, True, NOW)  # 3x the table's mean
    assert policy.plan(batch(4, slack_ms=50.0), NOW, ctx()).speed == pytest.approx(3.0 ** 0.5)
