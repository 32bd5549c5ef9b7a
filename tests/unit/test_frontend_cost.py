"""Planning for the frontend's cost: the learned per-batch and per-request costs, the planner's wait for a
larger batch when the frontend nears saturation, and the simulated frontend that makes it matter."""

from __future__ import annotations

import random

import numpy as np
import pytest

from slonn.policy.factory import make_policy
from slonn.policy.planner import FRONTEND_BATCH_SHARE, Pending, Plan, PlanContext, SLOAwarePolicy, Wait, \
    frontend_batch_target
from slonn.policy.table import LatencyTable
from slonn.scheduler.config import SLOClassConfig
from slonn.scheduler.core import Scheduler
from slonn.scheduler.driver import Driver, FrontendCost
from slonn.scheduler.errors import RequestError
from slonn.scheduler.simulator import LatencyDraw, SimConfig, simulate
from slonn.scheduler.trace import poisson_arrivals
from tests.fakes import WrappedPolicy

LEVELS = (1.0, 0.5, 0.25, 0.1)
ACCURACY = (0.97, 0.965, 0.96, 0.95)
MAX_BATCH = 64
TABLE = LatencyTable.constant(LEVELS, MAX_BATCH, per_item_ms=0.15, fixed_ms=0.15)


def ctx(rate: float, batch_ms: float = 0.5, request_ms: float = 0.5, overhead_ms: float = 1.0) -> PlanContext:
    return PlanContext(TABLE, 0, ACCURACY, MAX_BATCH, overhead_ms, frontend_batch_ms=batch_ms,
                       frontend_request_ms=request_ms, arrival_per_s=rate)


def pending(seq: int, now: float, deadline_ms: float, floor: float = 0.0) -> Pending:
    return Pending(seq, now, now + deadline_ms * 1e-3, floor, 1, "latency", "serve")


# -- the target batch size ------------------------------------------------------


def test_the_target_batch_is_one_at_low_load_and_grows_toward_saturation():
    assert frontend_batch_target(ctx(0.0)) == 1  # nothing measured
    assert frontend_batch_target(ctx(1000.0, batch_ms=0.0)) == 1  # the cost is unknown
    assert frontend_batch_target(ctx(200.0)) == frontend_batch_target(ctx(600.0)) == 1  # up to 0.6 of a core
    rates = (800.0, 1200.0, 1500.0, 1900.0)
    targets = [frontend_batch_target(ctx(r)) for r in rates]
    assert targets == sorted(targets) and targets[-1] > targets[0] > 1
    for r, n in zip(rates, targets):  # the target keeps the per-batch load within its share of the spare core
        assert r / n * 0.5e-3 <= FRONTEND_BATCH_SHARE * (1 - r * 0.5e-3) + 1e-9
        assert n == 1 or r / (n - 1) * 0.5e-3 > FRONTEND_BATCH_SHARE * (1 - r * 0.5e-3)  # and is the smallest
    assert frontend_batch_target(ctx(2000.0)) == MAX_BATCH  # the per-request cost alone fills the core


# -- the planner's wait -------------------------------------------------------------


def test_the_planner_waits_for_a_larger_batch_when_the_frontend_is_saturated():
    now = 10.0
    cands = [pending(0, now, 50.0), pending(1, now, 50.0)]
    decision = SLOAwarePolicy().plan(cands, now, ctx(1300.0))
    assert isinstance(decision, Wait) and now < decision.until_s < cands[0].deadline_s


@pytest.mark.parametrize("context", [ctx(0.0), ctx(200.0), ctx(1300.0, batch_ms=0.0)])
def test_the_planner_does_not_wait_when_the_frontend_is_idle_or_its_cost_unknown(context):
    now = 10.0
    cands = [pending(0, now, 50.0), pending(1, now, 50.0)]
    decision = SLOAwarePolicy().plan(cands, now, context)
    assert isinstance(decision, Plan) and decision.count == 2
    assert decision == SLOAwarePolicy(frontend=False).plan(cands, now, context)  # as it always planned


def test_the_planner_does_not_wait_with_frontend_planning_off():
    now = 10.0
    cands = [pending(0, now, 50.0)]
    policy = make_policy("slonn:frontend=0")
    assert not policy.may_wait
    assert isinstance(policy.plan(cands, now, ctx(1300.0)), Plan)
    with pytest.raises(ValueError, match="frontend"):
        make_policy("slonn:frontend=2")


def test_the_planner_never_waits_past_any_candidates_slack():
    rng = random.Random(3)
    waits = 0
    for _ in range(2000):
        now = 5.0
        n = rng.randint(1, 12)
        cands = sorted((pending(k, now - rng.uniform(0, 0.003), rng.uniform(1.0, 60.0),
                                rng.choice((0.0, 0.955, 0.962, 0.968))) for k in range(n)),
                       key=lambda p: (p.deadline_s, p.priority, p.seq))
        context = ctx(rng.uniform(0.0, 2000.0), rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0), rng.uniform(0.5, 5.0))
        policy = SLOAwarePolicy()
        decision = policy.plan(cands, now, context)
        if not isinstance(decision, Wait):
            continue
        waits += 1
        target = frontend_batch_target(context)
        assert len(cands) < target
        slowest_ms = max(TABLE.safe(0, i, target) for i in range(len(LEVELS)))
        for p in cands:  # a batch of the target size still makes every candidate's deadline at any level
            slack_ms = (p.deadline_s - decision.until_s) * 1e3
            assert slack_ms >= slowest_ms + context.overhead_ms + context.frontend_batch_ms - 1e-6
        # at the wake-up with nobody new the batch runs, in time, at a level its floors allow
        later = policy.plan(cands, decision.until_s, context)
        assert isinstance(later, Plan) and not later.late and later.count == len(cands)
    assert waits > 100


def test_asking_whether_to_wait_first_decides_as_planning_does():
    """The scheduler's pre-check (``wait_until`` before popping) and the popping path (``plan``) agree."""
    classes = {"a": SLOClassConfig("a", 30.0, 0.0, 0, 1000, "serve"),
               "b": SLOClassConfig("b", 60.0, 0.96, 1, 1000, "reject")}
    runs = []
    for policy in (SLOAwarePolicy(), WrappedPolicy(SLOAwarePolicy())):
        rng = random.Random(11)
        sched = Scheduler({"m": ACCURACY}, classes, policy)
        now, trace = 1.0, []
        for step in range(1500):
            now += rng.expovariate(1500.0)
            contexts = {"m": ctx(rng.choice((0.0, 900.0, 1300.0, 1500.0)))}
            for _ in range(rng.choice((0, 1, 1, 2))):
                req = sched.make_request("m", rng.choice(("a", "b")), now)
                try:
                    sched.add_request(req, now, contexts["m"])
                except RequestError:
                    trace.append("refused")
            out = sched.schedule(now, contexts)
            b = out.batch
            trace.append((out.wake_at_s, [r.pending.seq for r in out.expired],
                          None if b is None else ([r.pending.seq for r in b.requests], b.plan)))
        runs.append(trace)
    assert runs[0] == runs[1]
    assert any(t[0] is not None for t in runs[0] if t != "refused")  # it waited
    assert any(t[2] is not None and len(t[2][0]) > 4 for t in runs[0] if t != "refused")  # and batched


# -- learning the costs -----------------------------------------------------------


def test_learned_costs_converge_on_synthetic_observations():
    rng = np.random.default_rng(0)
    fe = FrontendCost(batch_ms=0.5, request_ms=0.5)  # the prior is off in both directions
    for _ in range(400):
        requests = rng.poisson(60)
        batches = max(1, int(requests / rng.uniform(1.0, 8.0)))
        cpu_ms = 0.8 * batches + 0.3 * requests + rng.normal(0.0, 1.0)
        fe.observe(cpu_ms, batches, requests, 0.05)
    assert fe.batch_ms == pytest.approx(0.8, rel=0.1)
    assert fe.request_ms == pytest.approx(0.3, rel=0.1)
    assert fe.arrival_per_s == pytest.approx(1200.0, rel=0.15)
    assert fe.load(1200.0 / 4) == pytest.approx((1200 * 0.3 + 300 * 0.8) * 1e-3, rel=0.15)


def test_an_idle_interval_decays_the_rate_and_keeps_the_costs():
    fe = FrontendCost(0.5, 0.5)
    for _ in range(50):
        fe.observe(0.6 * 5 + 0.4 * 40, 5, 40, 0.05)
    costs = (fe.batch_ms, fe.request_ms)
    fe.observe(0.3, 0, 0, 2.0)  # two quiet seconds: the loop's own upkeep
    assert (fe.batch_ms, fe.request_ms) == costs
    assert fe.arrival_per_s < 1.0


def test_the_driver_learns_the_frontend_from_its_cpu_and_puts_it_in_the_context():
    cpu = {"s": 0.0}
    driver = Driver(Scheduler({"m": ACCURACY}, {"c": SLOClassConfig("c", 50.0, 0.0, 1, 100000, "serve")},
                              SLOAwarePolicy()), {"m": TABLE}, {"m": ACCURACY}, MAX_BATCH,
                    frontend_cpu=lambda now: cpu["s"], frontend_batch_ms=0.5, frontend_request_ms=0.5)
    now, rng = 0.0, random.Random(1)
    while now < 3.0:
        now += 0.001  # 1000 requests/s
        driver.admit("m", "c", now)
        cpu["s"] += 0.2e-3
        out = driver.next_batches(1 if rng.random() < 0.3 else 0, now)
        cpu["s"] += 1.0e-3 * len(out.batches)
        for b in out.batches:
            driver.on_batch_done(b, 0.2, now)
            driver.release(len(b.requests))
    c = driver.contexts(now)["m"]  # up to the last interval closed (every FRONTEND_INTERVAL_S)
    assert c.frontend_batch_ms == pytest.approx(1.0, rel=0.1)
    assert c.frontend_request_ms == pytest.approx(0.2, rel=0.15)
    assert c.arrival_per_s == pytest.approx(1000.0, rel=0.1)


def test_a_driver_that_measures_no_frontend_gives_the_planner_no_frontend_cost():
    driver = Driver(Scheduler({"m": ACCURACY}, {"c": SLOClassConfig("c", 50.0)}, SLOAwarePolicy()), {"m": TABLE},
                    {"m": ACCURACY}, MAX_BATCH, frontend_batch_ms=0.5, frontend_request_ms=0.5)
    for k in range(200):
        driver.admit("m", "c", k * 1e-3)
    c = driver.contexts(1.0)["m"]
    assert (c.frontend_batch_ms, c.frontend_request_ms, c.arrival_per_s) == (0.0, 0.0, 0.0)


# -- the simulated frontend ----------------------------------------------------------


def sustained(policy: str, rate: float, frontend: bool = True) -> tuple[bool, float, float]:
    """(every request answered with p99 <= 50 ms, p99 ms, mean batch) of a simulated run; a single 50 ms
    class that serves late answers, one worker, a fast model (the frontend is the bottleneck)."""
    mean = LatencyTable.constant(LEVELS, MAX_BATCH, per_item_ms=0.15, fixed_ms=0.15)
    table = LatencyTable(LEVELS, MAX_BATCH, (), 1.3 * mean.mean_ms, mean.mean_ms.copy())
    draw = LatencyDraw({0.0: mean.mean_ms[0]}, {0.0: np.random.default_rng(0).lognormal(0.0, 0.1, 4096)})
    classes = {"c": SLOClassConfig("c", 50.0, 0.0, 1, 1 << 20, "serve")}
    cfg = SimConfig(workers=1, max_batch=MAX_BATCH, overhead_ms=1.0, dispatch_ms=0.3, reply_ms_per_request=0.0,
                    frontend_request_ms=0.5 if frontend else 0.0, frontend_batch_ms=0.5 if frontend else 0.0,
                    max_inflight=1 << 20)
    res = simulate(poisson_arrivals(rate, 4.0, {"c": 1.0}, seed=0), classes, make_policy(policy), table, ACCURACY,
                   draw, cfg, seed=0)
    ok = [r for r in res.records if r.status == "OK"]
    p99 = float(np.percentile([(r.answer_s - r.send_s) * 1e3 for r in ok], 99)) if ok else float("inf")
    return len(ok) == len(res.records) and p99 <= 50.0, p99, float(np.mean([r.batch_size for r in ok]))


def test_with_the_frontend_modelled_slonn_sustains_a_rate_dense_batching_and_latency_alone_do_not():
    rate = 1500.0
    assert not sustained("triton", rate)[0]
    assert not sustained("slonn:frontend=0", rate)[0]
    ok, p99, batch = sustained("slonn", rate)
    assert ok and batch > 8.0


def test_without_the_frontend_modelled_the_same_rate_is_no_wall():
    assert sustained("slonn:frontend=0", 1500.0, frontend=False)[0]


def test_the_frontend_model_is_one_or_the_other_admission_model():
    with pytest.raises(ValueError, match="both model admission"):
        SimConfig(ingress_ms_per_request=0.5, frontend_request_ms=0.5)


def test_a_wait_lasts_about_the_time_the_batch_should_take_to_fill_however_long_the_slack():
    from slonn.policy.planner import FRONTEND_FILL_FACTOR

    c = ctx(1300.0)
    target = frontend_batch_target(c)
    assert target > 2
    head = pending(0, 10.0, 5000.0)  # a relaxed class: seconds of slack
    bound = 10.0 + FRONTEND_FILL_FACTOR * (target - 1) / 1300.0
    policy = SLOAwarePolicy()
    for now in (10.0, 10.001, bound - 1e-6):  # deciding again does not move the bound
        decision = policy.plan([head], now, c)
        assert isinstance(decision, Wait) and decision.until_s == pytest.approx(bound)
    assert isinstance(policy.plan([head], bound, c), Plan)  # past it: whatever is queued runs


# -- one model's wait and the others ------------------------------------------------------------------

TWO_CLASSES = {"a": SLOClassConfig("a", 50.0, 0.0, 1, 1000, "serve"),
               "b": SLOClassConfig("b", 60.0, 0.0, 1, 1000, "serve")}


def test_a_model_waiting_for_a_larger_batch_holds_up_no_other_model():
    """Model A's head is the most urgent and waits (one request, the frontend near saturation); model B has
    a full target batch queued: the one idle worker gets B's batch now, and A's request stays queued."""
    c = ctx(1300.0)
    target = frontend_batch_target(c)
    assert 1 < target <= 16
    for policy in (SLOAwarePolicy(), WrappedPolicy(SLOAwarePolicy())):  # the wait_until pre-check, and plan's
        sched = Scheduler({"a": ACCURACY, "b": ACCURACY}, TWO_CLASSES, policy)
        contexts = {"a": c, "b": c}
        now = 10.0
        waiting = sched.make_request("a", "a", now)
        sched.add_request(waiting, now, c)
        others = [sched.make_request("b", "b", now) for _ in range(target)]
        for r in others:
            sched.add_request(r, now, c)
        assert isinstance(policy.plan([waiting.pending], now, c), Wait)
        out = sched.schedule(now, contexts)
        assert out.batch is not None and out.batch.model == "b" and out.batch.requests == others
        assert sched.pending("a") == 1 and sched.pending("b") == 0
        out = sched.schedule(now, contexts)  # now only A is left, and it waits
        assert out.batch is None and out.wake_at_s == SLOAwarePolicy().wait_until(waiting.pending, 1, now, c)


def test_with_every_model_waiting_the_scheduler_wakes_at_the_earliest_wait():
    c = ctx(1300.0)
    sched = Scheduler({"a": ACCURACY, "b": ACCURACY}, TWO_CLASSES, SLOAwarePolicy())
    early = sched.make_request("b", "b", 10.0)  # arrived first, later deadline: its batch should fill sooner
    sched.add_request(early, 10.0, c)
    now = 10.002
    urgent = sched.make_request("a", "a", now)  # the earlier deadline: A is the most urgent model
    sched.add_request(urgent, now, c)
    ends = {m: SLOAwarePolicy().wait_until(r.pending, 1, now, c) for m, r in (("a", urgent), ("b", early))}
    assert None not in ends.values() and ends["b"] < ends["a"]
    assert urgent.pending.deadline_s < early.pending.deadline_s
    out = sched.schedule(now, {"a": c, "b": c})
    assert out.batch is None and out.wake_at_s == ends["b"]


def test_the_driver_gives_idle_workers_to_the_models_that_do_not_wait():
    d = Driver(Scheduler({"a": ACCURACY, "b": ACCURACY}, TWO_CLASSES, SLOAwarePolicy()), {"a": TABLE, "b": TABLE},
               {"a": ACCURACY, "b": ACCURACY}, MAX_BATCH, overhead_ms=1.0, frontend_cpu=lambda _now: 0.0,
               frontend_batch_ms=0.5, frontend_request_ms=0.5)
    d.frontend.arrival_per_s = 1300.0  # as measured: the frontend near saturation
    now = 0.01  # within the first measuring interval: the costs stay as set
    c = d.contexts(now)["a"]
    target = frontend_batch_target(c)
    assert target > 1
    waiting = d.admit("a", "a", now)
    others = [d.admit("b", "b", now) for _ in range(target)]
    out = d.next_batches(2, now)
    assert [(b.model, b.requests) for b in out.batches] == [("b", others)]
    assert out.wake_at_s == SLOAwarePolicy().wait_until(waiting.pending, 1, now, c)
