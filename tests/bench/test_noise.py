"""`python -m bench.noise`: the per-call summary on synthetic calls of known shape."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from bench.noise import Call, history_feature, parse_cell, summarise
from slonn.policy.contention import CallTimes


def paused_calls(n: int = 200, seed: int = 0) -> list[Call]:
    """One cell: every call computes ~10 ms; a third of them are paused 10 ms more (wall only), and the pauses
    come in pairs, so the previous call says something about the next."""
    rng = np.random.default_rng(seed)
    out, t = [], 0.0
    for i in range(n):
        cpu = 10.0 + rng.normal(0, 0.2)
        paused = (i // 2) % 3 == 0
        wall = cpu + (10.0 if paused else 0.05)
        out.append(Call(0.1, 12, t, CallTimes(wall, cpu, 0.0), 3 if paused else 0))
        t += 0.012 + wall / 1e3
    return out


def test_parse_cell():
    assert parse_cell("0.1x12") == (0.1, 12)
    for bad in ("0.1", "2x4", "0.5x0", "ax3"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_cell(bad)


def test_paused_calls_are_the_slow_ones_and_cpu_time_does_not_scatter():
    s = summarise(paused_calls())
    cell = s["cells"]["0.1x12"]
    assert cell["slow_share"] == pytest.approx(1 / 3, abs=0.02)
    assert cell["lost_ms_median_slow"] == pytest.approx(10.0, abs=0.5)
    assert cell["lost_ms_median_fast"] < 0.5
    assert cell["steal_ticks_in_fast_calls"] == 0 < cell["steal_ticks_in_slow_calls"]
    # the wall-time scatter is the pauses: a cell mean is far off on wall time, close on CPU time
    assert cell["mape_cpu_cell_mean"] < 0.05 < cell["mape_wall_cell_mean"]
    # pauses come in pairs, so the recent past predicts part of the next call's pause
    assert s["lost_share_autocorr_lag1"] > 0.2
    assert cell["mape_wall_with_steal_feature"] < cell["mape_wall_cell_mean"]


def test_history_feature_looks_only_backwards():
    calls = [Call(1.0, 1, t, CallTimes(10.0, 10.0 - lost, None), None)
             for t, lost in ((0.0, 5.0), (0.05, 0.0), (0.5, 0.0))]
    f = history_feature(calls, window_s=0.1)
    assert f[0] == 0.0  # nothing before the first call
    assert f[1] == pytest.approx(0.5)  # the first call lost half its wall time
    assert f[2] == 0.0  # nothing in the 100 ms before t = 0.5
