"""`slonn compare` starts its live servers with the settings it was given."""

import argparse
from pathlib import Path

import pytest

from scripts.compare import StealSampler, live_serve_args, steal_pct
from scripts.serve import add_server_args


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
