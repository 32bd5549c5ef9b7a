"""`slonn compare` starts its live servers with the settings it was given."""

import argparse
from pathlib import Path

import pytest

from slonn.scripts.compare import StealSampler, live_serve_args, steal_pct
from slonn.scripts.serve import add_server_args


def namespace(**over) -> argparse.Namespace:
    base = dict(model_dir=Path("models/x"), workers=2, max_batch=32, overhead_ms=1.5, classes=None,
                precision="fp32", in_process=False, serve_nice=0, event_loop="asyncio", worker_spin_ms=0.0)
    return argparse.Namespace(**{**base, **over})


def serve_parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_server_args(p)
    return p.parse_args(argv)


def test_live_server_gets_policy_precision_and_pool_settings():
    got = serve_parse(live_serve_args(namespace(), "triton:max_batch=16"))
    assert (got.policy, got.precision, got.workers, got.max_batch) == ("triton:max_batch=16", "fp32", 2, 32)
    assert got.overhead_ms == 1.5 and not got.in_process


def test_in_process_and_classes_are_passed_on():
    got = serve_parse(live_serve_args(namespace(in_process=True, classes=Path("c.toml")), "slonn"))
    assert got.in_process and got.classes == Path("c.toml")


def test_serve_nice_is_passed_on_only_when_set():
    assert serve_parse(live_serve_args(namespace(), "slonn")).nice == 0
    assert serve_parse(live_serve_args(namespace(serve_nice=-10), "slonn")).nice == -10


def test_worker_spin_is_passed_on():
    assert serve_parse(live_serve_args(namespace(), "slonn")).worker_spin_ms == 0.0
    assert serve_parse(live_serve_args(namespace(worker_spin_ms=20.0), "slonn")).worker_spin_ms == 20.0


def test_event_loop_is_passed_on():
    assert serve_parse(live_serve_args(namespace(), "slonn")).event_loop == "asyncio"
    assert serve_parse(live_serve_args(namespace(event_loop="uvloop"), "slonn")).event_loop == "uvloop"


def test_steal_by_phase_uses_the_samples_nearest_each_bound():
    sampler = StealSampler()
    # 100 ticks per second; the host steals 10% of them from t = 10 on, nothing before.
    for t in range(0, 21):
        stolen = max(0, t - 10) * 10
        sampler.samples.append((float(t), [t * 100 - stolen, 0, 0, 0, 0, 0, 0, stolen]))
    assert sampler.steal_pct_between(0.0, 10.0) == 0.0
    assert sampler.steal_pct_between(10.2, 19.9) == 10.0
    assert sampler.steal_pct_between(5.0, 15.0) == 5.0
    assert sampler.steal_pct_between(3.0, 3.1) is None  # one sample: no interval
    assert sampler.series(0.0, 20.0, 5.0) == [0.0, 0.0, 10.0, 10.0]
    assert sampler.series(0.0, 12.0, 5.0) == [0.0, 0.0, 10.0]  # a short last bin, up to the end only
    assert sampler.series(0.0, 15.0, 10.0) == [0.0, 10.0]


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc/stat")
def test_steal_sampler_samples_while_open():
    with StealSampler(period_s=0.01) as sampler:
        import time

        time.sleep(0.05)
    assert len(sampler.samples) >= 2 and all(len(s[1]) >= 8 for s in sampler.samples)


def test_steal_share_of_cpu_time_between_readings():
    before = [100, 0, 50, 800, 0, 0, 0, 50, 0, 0]
    after = [200, 0, 100, 1500, 0, 0, 0, 150, 0, 0]  # 950 ticks in all, 100 of them stolen
    assert steal_pct(before, after) == round(100 * 100 / 950, 2)
    assert steal_pct(None, after) is None and steal_pct(before, before) is None


def test_sim_live_gap_is_per_policy_run_in_both_modes():
    from slonn.scripts.compare import markdown, sim_live_gap

    def row(mode, policy, inter, during=None):
        return {"mode": mode, "policy": policy, "attain_interactive": inter, "attain_all": inter,
                "during_interactive": during, "served_accuracy": 0.98, "p99_ms": 1.0, "p99_interactive_ms": 1.0}

    rows = [row("sim", "slonn", 1.0, 1.0), row("sim", "triton", 0.93, 0.9), row("live", "slonn", 0.996, 0.99),
            row("live", "triton", 0.75, 0.8), row("sim", "aimd", 0.9)]  # aimd ran in one mode only
    gaps = sim_live_gap(rows, ["interactive"])
    assert gaps == {"slonn": {"interactive": 0.4, "all": 0.4, "during_interactive": 1.0},
                    "triton": {"interactive": 18.0, "all": 18.0, "during_interactive": 10.0}}
    assert "| `triton` | +18.0 | +18.0 | +10.0 |" in markdown(rows, ["interactive"], 0.98, (1.0, 2.0))
    assert sim_live_gap([r for r in rows if r["mode"] == "sim"], ["interactive"]) == {}
