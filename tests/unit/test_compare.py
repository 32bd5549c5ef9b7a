"""`slonn compare` starts its live servers with the settings it was given."""

import argparse
from pathlib import Path

from scripts.compare import live_serve_args, steal_pct
from scripts.serve import add_server_args


def namespace(**over) -> argparse.Namespace:
    base = dict(model_dir=Path("models/x"), workers=2, max_batch=32, overhead_ms=1.5, classes=None,
                precision="fp32", in_process=False, serve_nice=0)
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


def test_steal_share_of_cpu_time_between_readings():
    before = [100, 0, 50, 800, 0, 0, 0, 50, 0, 0]
    after = [200, 0, 100, 1500, 0, 0, 0, 150, 0, 0]  # 950 ticks in all, 100 of them stolen
    assert steal_pct(before, after) == round(100 * 100 / 950, 2)
    assert steal_pct(None, after) is None and steal_pct(before, before) is None
