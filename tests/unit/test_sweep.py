"""`slonn sweep`'s pure parts: saturation, the per-rate row, CPU accounting, stopping, arguments."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from slonn.scheduler import sweep
from slonn.scheduler.report import RequestRecord
from slonn.scheduler.serverproc import CpuMeter, CpuUse
from slonn.scheduler.sweep import SaturationRule, labelled_inputs, max_sustained, rate_point
from slonn.scripts.sweep import parse_args


def _point(offered=100.0, achieved=100.0, p99=10.0, deadline=50.0, saturated=False, rate=100.0) -> dict:
    return {"offered_per_s": offered, "achieved_per_s": achieved, "p99_ms": p99, "deadline_ms": deadline,
            "saturated": saturated, "rate_per_s": rate}


def _records(n: int, duration_s: float, latency_ms: float, deadline_ms: float = 50.0, ok: int | None = None,
             tail_s: float = 0.0) -> list[RequestRecord]:
    """n requests spread over duration_s, each answered latency_ms later (the last tail_s later still)."""
    out = []
    ok = n if ok is None else ok
    for i in range(n):
        send = duration_s * i / n
        answer = send + latency_ms * 1e-3 + (tail_s if i == n - 1 else 0.0)
        out.append(RequestRecord(i, sweep.SWEEP_CLASS, deadline_ms, send, answer, "OK" if i < ok else "UNAVAILABLE",
                                 batch_size=1))
    return out


def test_a_rate_served_in_time_is_not_saturated():
    assert SaturationRule().reasons(_point()) == []


def test_achieved_below_the_share_of_offered_is_saturated():
    why = SaturationRule(min_achieved_share=0.95).reasons(_point(achieved=94.0))
    assert len(why) == 1 and "achieved 94" in why[0]
    assert SaturationRule(min_achieved_share=0.95).reasons(_point(achieved=95.0)) == []


def test_p99_over_the_deadline_is_saturated_and_no_answer_too():
    assert "p99 51 ms > deadline 50 ms" in SaturationRule().reasons(_point(p99=51.0))
    assert "no request answered OK" in SaturationRule().reasons(_point(p99=None, achieved=0.0))


def test_stops_only_after_consecutive_saturated_rates():
    rule = SaturationRule(consecutive=2)
    assert not rule.should_stop([_point(saturated=True)])
    assert not rule.should_stop([_point(saturated=True), _point(saturated=False)])
    assert rule.should_stop([_point(), _point(saturated=True), _point(saturated=True)])
    assert SaturationRule(consecutive=1).should_stop([_point(saturated=True)])


def test_bad_rules_are_refused():
    with pytest.raises(ValueError):
        SaturationRule(min_achieved_share=0.0)
    with pytest.raises(ValueError):
        SaturationRule(consecutive=0)


def test_max_sustained_is_the_last_rate_before_the_first_saturated_one():
    points = [_point(rate=100), _point(rate=200), _point(rate=400, saturated=True), _point(rate=800)]
    assert max_sustained(points) == 200
    assert max_sustained([_point(rate=100, saturated=True)]) is None


def test_rate_point_counts_the_window_until_the_last_answer():
    records = _records(200, 2.0, latency_ms=5.0, tail_s=2.0)  # the last answer comes 2 s after the load ends
    p = rate_point(records, 100.0, "unary", 2.0, 50.0, {"server_cpu_ms": 0.5, "worker_cpu_ms": 0.2}, 0.06)
    assert p["offered_per_s"] == 100.0
    # the window runs to the last answer, less one deadline (50 ms)
    assert p["achieved_per_s"] == pytest.approx(200 / (2.0 * 199 / 200 + 0.005 + 2.0 - 0.05), abs=0.01)
    assert p["within_deadline"] == pytest.approx(199 / 200)
    assert p["p50_ms"] == pytest.approx(5.0)
    assert p["client_cpu_ms"] == pytest.approx(0.3)
    assert p["server_cpu_ms"] == 0.5 and p["worker_cpu_ms"] == 0.2


def test_answers_within_a_deadline_of_the_end_do_not_stretch_the_window():
    p = rate_point(_records(200, 2.0, latency_ms=40.0), 100.0, "unary", 2.0, 50.0, {}, 0.0)
    assert p["achieved_per_s"] == 100.0


def test_rate_point_counts_only_ok_answers_as_achieved():
    p = rate_point(_records(100, 1.0, 5.0, ok=50), 100.0, "stream", 1.0, 50.0, {}, 0.0)
    assert p["achieved_per_s"] == 50.0 and p["errors"] == {"UNAVAILABLE": 50}
    assert SaturationRule().reasons(p)


class _FakeProc:
    """CPU seconds per pid, and the children of a server that come and go."""

    def __init__(self) -> None:
        self.cpu = {1: 10.0, 2: 5.0, 3: 7.0}
        self.children = [2, 3]


def test_cpu_meter_splits_server_and_children_and_counts_a_new_child_from_zero():
    f = _FakeProc()
    meter = CpuMeter(1, cpu_of=lambda pid: f.cpu.get(pid, 0.0), children_of=lambda pid: list(f.children))
    before = meter.read()
    f.cpu.update({1: 10.5, 2: 5.25, 3: 7.0, 4: 0.125})
    f.children = [2, 3, 4]  # a worker started inside the window (e.g. a replacement)
    use = meter.since(before)
    assert use.server_s == pytest.approx(0.5)
    assert use.children_s == pytest.approx(0.375)
    assert use.per_request_ms(100) == {"server_cpu_ms": 5.0, "worker_cpu_ms": 3.75}


def test_cpu_meter_drops_a_child_that_exited_and_never_goes_negative():
    f = _FakeProc()
    meter = CpuMeter(1, cpu_of=lambda pid: f.cpu.get(pid, 0.0), children_of=lambda pid: list(f.children))
    before = meter.read()
    f.children = [2]  # child 3 exited: what it used is gone with it
    f.cpu[2] = 4.0  # a pid reused by a younger process reads less than before
    use = meter.since(before)
    assert use.server_s == 0.0 and use.children_s == 0.0


def test_cpu_per_request_of_no_requests_is_none():
    assert CpuUse(1.0, 1.0).per_request_ms(0) == {"server_cpu_ms": None, "worker_cpu_ms": None}


def test_labelled_inputs_are_distinct_and_keep_their_labels():
    from slonn.workers.digits import load_split

    x, y = labelled_inputs(1000, seed=3)
    split = load_split(seed=0)
    assert len(np.unique(x, axis=0)) == 1000
    assert np.array_equal(y, split.y_test[np.arange(1000) % len(split.y_test)])
    assert np.abs(x - split.x_test[np.arange(1000) % len(split.x_test)]).max() < 0.1
    assert not np.array_equal(x, labelled_inputs(1000, seed=4)[0])


def test_sweep_stops_at_saturation_and_does_not_report_the_warmup(monkeypatch):
    """A fake server that keeps up to 300/s and falls behind above it."""
    sent_rates = []

    async def fake_replay(target, model, arrivals, deadlines, **kw):
        rate = len(arrivals) / arrivals.duration_s
        sent_rates.append(round(rate, -2))
        latency = 5.0 if rate < 300 else 80.0
        assert len(kw["inputs"][0]) == len(arrivals)  # an input of its own per request
        return _records(len(arrivals), arrivals.duration_s, latency, deadlines[sweep.SWEEP_CLASS])

    monkeypatch.setattr(sweep, "replay", fake_replay)
    rates = [100.0, 200.0, 400.0, 800.0, 1600.0]
    points = asyncio.run(sweep.sweep_transport("t", "m", "unary", rates, 5.0, 50.0, warmup_s=1.0))
    assert [p["rate_per_s"] for p in points] == [100.0, 200.0, 400.0, 800.0]  # 1600 never offered
    assert len(sent_rates) == 5  # warm-up + 4 rates
    assert [p["saturated"] for p in points] == [False, False, True, True]
    assert points[0]["server_cpu_ms"] is None  # no meter, no CPU columns
    assert max_sustained(points) == 200.0


def test_sweep_arguments():
    args = parse_args(["--rates", "100,200", "--transports", "stream", "--", "--precision", "fp32"])
    assert args.rates == [100.0, 200.0] and args.transports == ["stream"] and args.serve_args == ["--precision",
                                                                                                    "fp32"]
    for bad in (["--rates", "200,100"], ["--rates", "0"], ["--transports", "carrier-pigeon"],
                ["--server-pid", "1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_multi_sample_rows_count_samples_and_calls_and_cpu_per_call():
    records = _records(800, 1.0, latency_ms=5.0)  # one record per sample: 100 calls of 8
    p = rate_point(records, 800.0, "multi", 1.0, 50.0, {"server_cpu_ms": 0.1, "worker_cpu_ms": 0.05}, 0.08,
                   samples_per_call=8)
    assert p["samples_per_call"] == 8
    assert p["offered_per_s"] == 800.0 and p["achieved_per_s"] == 800.0
    assert p["offered_calls_per_s"] == 100.0 and p["achieved_calls_per_s"] == 100.0
    assert p["server_cpu_ms"] == 0.1 and p["server_cpu_ms_per_call"] == pytest.approx(0.8)
    assert p["client_cpu_ms"] == pytest.approx(0.1)
    assert "n/call" in sweep.format_sweep_table([p]) and "calls/s" in sweep.format_sweep_table([p])


def test_multi_sample_sweep_offers_calls_at_rate_over_n_with_an_input_per_sample(monkeypatch):
    seen = []

    async def fake_replay(target, model, arrivals, deadlines, **kw):
        k = kw["samples_per_call"]
        seen.append((kw["transport"], k, len(arrivals) / arrivals.duration_s))
        assert len(kw["inputs"][0]) == len(arrivals) * k  # an input of its own per sample
        return _records(len(arrivals) * k, arrivals.duration_s, 5.0)

    monkeypatch.setattr(sweep, "replay", fake_replay)
    points = asyncio.run(sweep.sweep_transport("t", "m", "multi", [800.0], 5.0, 50.0, warmup_s=0.0,
                                               samples_per_call=8))
    assert [(t, k) for t, k, _ in seen] == [("multi", 8)]
    assert seen[0][2] == pytest.approx(100.0, rel=0.3)  # calls/s: the sample rate over 8 (a Poisson draw)
    assert points[0]["samples_per_call"] == 8
    assert points[0]["achieved_calls_per_s"] == pytest.approx(points[0]["achieved_per_s"] / 8, abs=0.01)
    asyncio.run(sweep.sweep_transport("t", "m", "unary", [800.0], 1.0, 50.0, warmup_s=0.0, samples_per_call=8))
    assert seen[-1][:2] == ("unary", 1)  # the single-sample transports ignore samples_per_call


def test_sweep_multi_sample_arguments():
    args = parse_args(["--transports", "unary,multi,multi-stream", "--samples-per-call", "4"])
    assert args.transports == ["unary", "multi", "multi-stream"] and args.samples_per_call == 4
    with pytest.raises(SystemExit):
        parse_args(["--samples-per-call", "0"])
