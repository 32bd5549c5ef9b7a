"""The simulator: the real Scheduler on a virtual clock; every request answered exactly once."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from slonn.policy.table import LatencyTable
from slonn.scheduler.config import SLOClassConfig
from slonn.scheduler.core import Scheduler
from slonn.scheduler.report import summarize
from slonn.policy.factory import make_policy
from slonn.scheduler.simulator import (
    ContentionProfile,
    LatencyDraw,
    SimConfig,
    simulate,
)
from slonn.scheduler.trace import poisson_arrivals
from tests.fakes import WrappedPolicy

LEVELS = (1.0, 0.5, 0.25, 0.1)
ACCURACY = (0.97, 0.965, 0.96, 0.95)
CLASSES = {
    "interactive": SLOClassConfig("interactive", 10.0, 0.95, 0, 64, "reject"),
    "standard": SLOClassConfig("standard", 50.0, 0.96, 1, 256, "reject"),
    "batch": SLOClassConfig("batch", 200.0, 0.97, 2, 1024, "serve"),
}
MIX = {"interactive": 0.4, "standard": 0.4, "batch": 0.2}


def table(per_item_ms: float = 0.2) -> LatencyTable:
    return LatencyTable.constant(LEVELS, 16, per_item_ms=per_item_ms, fixed_ms=0.5)


def run(policy, rate: float = 800.0, duration_s: float = 2.0, seed: int = 0, per_item_ms: float = 0.2, **kw):
    t = table(per_item_ms)
    arrivals = poisson_arrivals(rate, duration_s, MIX, seed=seed)
    contention = kw.pop("contention", ContentionProfile())
    draw = kw.pop("draw", None) or LatencyDraw.from_table(t, contention.states)
    cfg = kw.pop("cfg", SimConfig(max_batch=16))
    return arrivals, simulate(arrivals, CLASSES, policy, t, ACCURACY, draw, cfg, contention, seed=seed, **kw)


def assert_answered_once(arrivals, result):
    records = result.records
    assert [r.index for r in records] == list(range(len(arrivals)))
    assert all(r.status != "UNANSWERED" for r in records)
    assert all(np.isfinite(r.answer_s) and r.answer_s >= r.send_s for r in records)
    summary = summarize(records, arrivals.duration_s)
    total = summary["all"]
    assert total["sent"] == len(arrivals) == sum(s["sent"] for name, s in summary.items() if name != "all")
    assert total["answered_ok"] + sum(total["errors"].values()) == total["sent"]
    assert total["within_deadline"] <= total["answered_ok"]
    assert sum(total["levels"].values()) == total["answered_ok"]
    return summary


@pytest.mark.parametrize("name", ["slonn", "slonn:recent_tau_ms=60", "triton", "triton:max_delay_ms=3", "fixed:0.25",
                                  "aimd"])
def test_every_request_is_answered_exactly_once(name):
    arrivals, result = run(make_policy(name))
    summary = assert_answered_once(arrivals, result)
    assert summary["all"]["answered_ok"] > 0
    # Every OK answer came out of a batch the scheduler planned.
    assert result.batches >= max(1, summary["all"]["answered_ok"] // 16)


def test_overload_ends_in_explicit_errors_not_silence():
    arrivals, result = run(make_policy("slonn"), rate=6000.0, duration_s=1.0, per_item_ms=2.0)
    summary = assert_answered_once(arrivals, result)
    assert summary["all"]["errors"]  # deadline / queue-full rejections, each answered


def test_triton_never_drops_early_and_late_requests_time_out_at_the_client():
    arrivals, result = run(make_policy("triton"), rate=6000.0, duration_s=1.0, per_item_ms=2.0)
    summary = assert_answered_once(arrivals, result)
    statuses = Counter(r.status for r in result.records)
    # No request is refused before its deadline: the only DEADLINE_EXCEEDED answers are results that came
    # back late in an on_late = "reject" class.
    refused = [r for r in result.records if r.status == "DEADLINE_EXCEEDED"]
    assert refused and all(r.latency_ms > r.deadline_ms and CLASSES[r.slo_class].on_late == "reject" for r in refused)
    assert statuses["CLIENT_TIMEOUT"] > 0 or statuses["RESOURCE_EXHAUSTED"] > 0
    assert summary["interactive"]["attainment"] < 0.5


def test_late_is_the_servers_flag_set_only_where_a_class_serves_late():
    """As the live replay records it (the response's ``late``): in a batch planned late on purpose, not just
    slow. Only a class with on_late="serve" is planned late; with none, nothing is flagged, however slow."""
    arrivals, result = run(make_policy("slonn"), rate=6000.0, duration_s=1.0, per_item_ms=2.0)
    late = [r for r in result.records if r.late]
    assert late and all(r.status == "OK" for r in late)
    assert any(r.slo_class == "batch" for r in late)  # the on_late="serve" class heads the late batches
    reject_all = {name: replace(c, on_late="reject") for name, c in CLASSES.items()}
    t = table(2.0)
    overload = poisson_arrivals(6000.0, 1.0, MIX, seed=0)
    strict = simulate(overload, reject_all, make_policy("slonn"), t, ACCURACY, LatencyDraw.from_table(t, (0.0,)),
                      SimConfig(max_batch=16))
    slow = [r for r in strict.records if r.status == "OK" and not r.on_time]  # the reply and dispatch costs
    assert slow and not any(r.late for r in strict.records)


class SpyPolicy(WrappedPolicy):
    """The real slonn policy, counting what the Scheduler asks of it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = Counter()

    def is_hopeless(self, p, now_s, ctx):
        self.calls["is_hopeless"] += 1
        return super().is_hopeless(p, now_s, ctx)

    def plan(self, candidates, now_s, ctx):
        self.calls["plan"] += 1
        return super().plan(candidates, now_s, ctx)

    def observe(self, plan, exec_ms, deadline_met, finished_s):
        self.calls["observe"] += 1


def test_the_simulator_drives_the_real_scheduler_and_policy():
    spy = SpyPolicy()
    arrivals, result = run(spy)
    assert spy.calls["plan"] == result.batches  # slonn never waits: one plan per batch
    assert spy.calls["observe"] == result.batches  # update_from_output after every batch
    assert spy.calls["is_hopeless"] >= len(arrivals)  # add_request asks on every admission


def test_a_scheduler_passed_in_is_the_one_used():
    spy = SpyPolicy()
    sched = Scheduler({"m": ACCURACY}, CLASSES, spy)
    arrivals, result = run(spy, scheduler=sched, model="m")
    assert sched.pending() == 0
    assert spy.calls["observe"] == result.batches > 0


def test_deterministic_for_a_seed():
    _, a = run(make_policy("slonn"), seed=3)
    _, b = run(make_policy("slonn"), seed=3)
    key = lambda rs: [(r.status, r.answer_s, r.level, r.batch_size, r.correct) for r in rs]
    assert key(a.records) == key(b.records)


def test_correctness_comes_from_the_given_predictions_per_level():
    n_inputs = 7
    correct = np.zeros((len(LEVELS), n_inputs), bool)
    correct[:, 2] = True  # only input 2 is ever right, at every level
    arrivals, result = run(make_policy("slonn"), correct=correct)
    for r in result.records:
        if r.status == "OK":
            assert r.correct == (r.index % n_inputs == 2)


def test_contention_window_slows_the_draw_and_moves_the_planner_bucket():
    levels_t = LatencyTable(LEVELS, 16, (0.25,), np.stack([table().safe_ms[0], 4 * table().safe_ms[0]]),
                            np.stack([table().mean_ms[0], 4 * table().mean_ms[0]]))
    contention = ContentionProfile(0.0, 0.5, 0.5, 1.0)
    draw = LatencyDraw.from_table(levels_t, contention.states)
    arrivals = poisson_arrivals(400.0, 1.5, MIX, seed=1)
    result = simulate(arrivals, CLASSES, make_policy("slonn"), levels_t, ACCURACY, draw,
                      SimConfig(max_batch=16, signal_lag_s=0.0), contention)
    assert_answered_once(arrivals, result)
    per_item = lambda r: r.exec_ms / levels_t.mean(0, levels_t.level_index(r.level), r.batch_size)
    during = [per_item(r) for r in result.records if r.status == "OK" and 0.55 <= r.send_s < 0.95]
    outside = [per_item(r) for r in result.records if r.status == "OK" and r.send_s < 0.45]
    assert during and outside
    assert min(during) == pytest.approx(4.0) and max(outside) == pytest.approx(1.0)


def test_admission_times_are_a_one_server_fifo():
    from slonn.scheduler.simulator import admission_times

    # A clump of three at t=0 leaves one cost apart; a later arrival after the queue emptied waits for nobody.
    assert admission_times([0.0, 0.0, 0.0, 0.0105, 1.0], 0.005) == pytest.approx([0.005, 0.010, 0.015, 0.020, 1.005])


def test_a_slow_frontend_turns_a_clump_into_a_staircase_and_deadlines_count_from_the_send():
    from slonn.scheduler.trace import Arrivals

    # 40 interactive requests sent at the same instant; the frontend admits one every 0.5 ms.
    n = 40
    arrivals = Arrivals(np.zeros(n), ["interactive"] * n, "clump", (0.0, 1.0), 1.0)
    t = table(per_item_ms=0.01)
    draw = LatencyDraw.from_table(t, ContentionProfile().states)
    plain = simulate(arrivals, CLASSES, make_policy("slonn"), t, ACCURACY, draw, SimConfig(max_batch=16))
    slow = simulate(arrivals, CLASSES, make_policy("slonn"), t, ACCURACY, draw,
                    SimConfig(max_batch=16, ingress_ms_per_request=0.5))
    for result in (plain, slow):
        assert_answered_once(arrivals, result)
    assert all(r.status == "OK" for r in plain.records)
    # The 20th admission is at 10 ms, the interactive deadline: from there on nothing can be on time, and
    # the server side says so (DEADLINE_EXCEEDED) instead of serving late.
    late = [r for r in slow.records if r.status != "OK"]
    assert late and all(r.status == "DEADLINE_EXCEEDED" for r in late)
    assert min(r.index for r in late) >= 10
    ok = [r for r in slow.records if r.status == "OK"]
    assert all(r.answer_s - r.send_s <= 0.010 for r in ok)
    assert max(r.answer_s for r in ok) > max(r.answer_s for r in plain.records)


def test_make_policy_reads_slonns_recent_slowdown_setting_and_names_bad_ones():
    assert make_policy("slonn").recent.tau_s == 0.0  # off by default
    assert make_policy("slonn:recent_tau_ms=150").recent.tau_s == pytest.approx(0.15)
    assert make_policy("slonn:recent_tau_ms=0").recent.tau_s == 0.0
    for bad, word in (("slonn:tau=1", "unknown parameter"), ("slonn:recent_tau_ms=-1", "recent_tau_ms"),
                      ("slonn:recent_tau_ms=x", "recent_tau_ms"), ("slonn:recent_tau_ms=inf", "recent_tau_ms"),
                      ("slonnx", "unknown policy")):
        with pytest.raises(ValueError, match=word):
            make_policy(bad)
