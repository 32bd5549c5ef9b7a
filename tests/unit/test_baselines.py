"""Baseline policies: decisions on hand-built candidates and times (no clock, no server)."""

from __future__ import annotations

import pytest

from slonn.policy.baselines import AIMDPolicy, DynamicBatchingPolicy, make_baseline
from slonn.policy.factory import make_policy
from slonn.policy.names import PolicyName
from slonn.policy.planner import Pending, Plan, PlanContext, Wait
from slonn.policy.table import LatencyTable

LEVELS = (1.0, 0.5, 0.25, 0.1)


def ctx(max_batch: int = 8) -> PlanContext:
    table = LatencyTable.constant(LEVELS, max_batch, per_item_ms=1.0, fixed_ms=0.5)
    return PlanContext(table, 0, (0.97, 0.97, 0.96, 0.95), max_batch, 1.0)


def pend(seq: int, arrival_s: float, deadline_ms: float = 25.0) -> Pending:
    return Pending(seq, arrival_s, arrival_s + deadline_ms * 1e-3, 0.95, 0, "latency", "reject")


def test_triton_waits_until_the_oldest_has_waited_max_delay():
    policy = make_baseline("triton:max_delay_ms=5")
    cands = [pend(0, 1.000), pend(1, 1.002)]
    decision = policy.plan(cands, 1.003, ctx())
    assert isinstance(decision, Wait)
    assert decision.until_s == pytest.approx(1.005)


def test_triton_dispatches_everything_once_the_delay_is_up():
    policy = make_baseline("triton:max_delay_ms=5")
    cands = [pend(0, 1.000), pend(1, 1.002), pend(2, 1.004)]
    decision = policy.plan(cands, 1.005, ctx())
    assert isinstance(decision, Plan)
    assert (decision.count, decision.level) == (3, 1.0)
    assert decision.predicted_ms == pytest.approx(0.5 + 3 * 1.0)


def test_triton_dispatches_a_full_batch_at_once():
    policy = make_baseline("triton:max_delay_ms=100")
    cands = [pend(i, 1.0 + i * 1e-4) for i in range(11)]
    decision = policy.plan(cands, 1.001, ctx(max_batch=8))
    assert isinstance(decision, Plan) and decision.count == 8 and decision.level == 1.0


def test_triton_max_batch_parameter_caps_below_the_server():
    policy = make_baseline("triton:max_batch=4,max_delay_ms=100")
    decision = policy.plan([pend(i, 1.0) for i in range(6)], 1.0, ctx(max_batch=8))
    assert isinstance(decision, Plan) and decision.count == 4


def test_triton_preferred_batch_size_dispatches_early():
    policy = make_baseline("triton:preferred=2/4,max_delay_ms=100")
    decision = policy.plan([pend(i, 1.0) for i in range(3)], 1.0, ctx())
    assert isinstance(decision, Plan) and decision.count == 2


def test_triton_zero_delay_never_waits():
    policy = make_baseline("triton:max_delay_ms=0")
    decision = policy.plan([pend(0, 1.0)], 1.0, ctx())
    assert isinstance(decision, Plan) and decision.count == 1


def test_triton_is_fifo_and_never_drops():
    policy = make_baseline("triton")
    early_arrival_late_deadline = pend(0, 1.0, deadline_ms=500)
    late_arrival_early_deadline = pend(1, 1.1, deadline_ms=5)
    assert policy.order_key(early_arrival_late_deadline) < policy.order_key(late_arrival_early_deadline)
    assert not policy.is_hopeless(late_arrival_early_deadline, 99.0, ctx())


def test_fixed_level_runs_at_its_level():
    policy = make_baseline("fixed:0.25,max_delay_ms=0")
    decision = policy.plan([pend(0, 1.0), pend(1, 1.0)], 1.0, ctx())
    assert isinstance(decision, Plan) and decision.level == 0.25 and decision.count == 2
    assert decision.predicted_ms == pytest.approx(0.5 + 2 * 0.25)


def test_fixed_level_not_in_the_model_names_the_levels():
    policy = make_baseline("fixed:0.3")
    with pytest.raises(ValueError, match="0.3 is not one of"):
        policy.plan([pend(0, 1.0)], 2.0, ctx())


def test_aimd_increases_additively_and_backs_off_multiplicatively():
    policy = make_baseline("aimd:start=4,step=1,backoff=0.5,signal=deadline")
    assert isinstance(policy, AIMDPolicy)
    cands = [pend(i, 1.0) for i in range(8)]
    plan = policy.plan(cands, 1.0, ctx())
    assert plan.count == 4 and plan.level == 1.0
    policy.observe(plan, 3.0, True, 1.0)
    policy.observe(plan, 3.0, True, 1.0)
    assert policy.plan(cands, 1.0, ctx()).count == 6
    policy.observe(plan, 30.0, False, 1.0)
    assert policy.plan(cands, 1.0, ctx()).count == 3
    for _ in range(5):
        policy.observe(plan, 300.0, False, 1.0)
    assert policy.plan(cands, 1.0, ctx()).count == 1  # never below one


def test_aimd_default_signal_is_batch_exec_latency_against_the_slo():
    """Clipper: a batch within the SLO grows the cap even if queueing made its requests late."""
    policy = make_baseline("aimd:start=4,backoff=0.5")
    cands = [pend(i, 1.0, deadline_ms=25.0) for i in range(8)]
    plan = policy.plan(cands, 1.0, ctx())
    policy.observe(plan, 20.0, False, 1.0)  # 20 ms + 1 ms overhead <= 25 ms: increase despite the missed deadline
    assert policy.cap == 5
    plan = policy.plan(cands, 1.0, ctx())
    policy.observe(plan, 24.5, True, 1.0)  # 24.5 + 1 > 25: decrease
    assert policy.cap == 2.5


def test_aimd_cap_stops_at_max_batch_and_batch_is_bounded_by_the_queue():
    policy = make_baseline("aimd")
    c = ctx(max_batch=8)
    plan = policy.plan([pend(0, 1.0)], 1.0, c)
    for _ in range(50):
        policy.observe(plan, 1.0, True, 1.0)
    assert policy.cap == 8
    assert policy.plan([pend(i, 1.0) for i in range(3)], 1.0, c).count == 3
    assert policy.plan([pend(i, 1.0) for i in range(20)], 1.0, c).count == 8


@pytest.mark.parametrize("name, cls", [("triton", DynamicBatchingPolicy), ("fixed:0.5", DynamicBatchingPolicy),
                                       ("aimd", AIMDPolicy)])
def test_make_policy_builds_baselines(name, cls):
    policy = make_policy(name)
    assert isinstance(policy, cls) and policy.name == name


@pytest.mark.parametrize("kind", list(PolicyName))
def test_every_policy_name_builds_its_policy(kind):
    spec = f"{kind}:0.5" if kind == PolicyName.FIXED else str(kind)
    assert make_policy(spec).name.partition(":")[0] == kind


@pytest.mark.parametrize("bad", ["tritonx", "triton:max_delay=3", "triton:max_delay_ms", "fixed:", "fixed:abc",
                                 "fixed:1.5", "aimd:backoff=2", "aimd:foo=1"])
def test_bad_names_raise_with_the_name(bad):
    with pytest.raises(ValueError, match="polic"):
        make_baseline(bad)


@pytest.mark.parametrize("name", ["triton:x=2", "fixed:0.1,x=2", "aimd:x=2"])
def test_an_unknown_parameter_is_named_with_the_known_ones(name):
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['x'\]; known: \["):
        make_baseline(name)
