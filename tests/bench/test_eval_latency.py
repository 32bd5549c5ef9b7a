"""The eval's noise-floor oracle: the scatter of repeated measurements of one cell."""

from __future__ import annotations

import pytest

from bench.eval_latency import cell_median_oracle
from slonn.policy.latency_model import LatencySample


def _rows(values_by_cell):
    rows, dicts = [], []
    for (level, batch, burn), values in values_by_cell.items():
        for v in values:
            rows.append(LatencySample(level, batch, 0.0, v))
            dicts.append({"burn": burn})
    return rows, dicts


def test_constant_cells_have_no_noise():
    rows, dicts = _rows({(0.1, 1, "0x1"): [2.0] * 4, (1.0, 8, "1x1"): [9.0] * 4})
    out = cell_median_oracle(rows, dicts, train=[0, 1, 2, 4, 5, 6], test=[3, 7])
    assert out["mape_pct"] == 0.0
    assert out["per_intensity"] == {"0x1": 0.0, "1x1": 0.0}


def test_scatter_within_a_cell_is_the_floor():
    # Training median 10; held-out 8 and 12.5: errors 25% and 20%.
    rows, dicts = _rows({(0.1, 1, "2x1"): [9.0, 10.0, 11.0, 8.0, 12.5]})
    out = cell_median_oracle(rows, dicts, train=[0, 1, 2], test=[3, 4])
    assert out["mape_pct"] == pytest.approx(22.5)


def test_held_out_rows_of_unmeasured_cells_are_skipped():
    rows, dicts = _rows({(0.1, 1, "0x1"): [1.0, 1.0], (0.5, 2, "0x1"): [3.0]})
    out = cell_median_oracle(rows, dicts, train=[0], test=[1, 2])
    assert out["mape_pct"] == 0.0


def test_unpaused_rows_leave_out_what_the_host_took():
    import numpy as np

    from bench.eval_latency import _unpaused

    # four held-out rows: two the host did not pause (the model is right), two it paused (the model is 50% off)
    actual = np.array([10.0, 10.0, 20.0, 20.0])
    mean = np.full(4, 10.0)
    dicts = [{"host_pause_ms": p} for p in ("0.1", "0.4", "10.0", "9.5")]
    out = _unpaused(dicts, [0, 1, 2, 3], actual, mean, mean * 2, mean, mean * 2)
    assert out["paused_rows_share"] == 0.5
    assert out["unpaused_rows"]["rows"] == 2 and out["unpaused_rows"]["mape_pct"] == 0.0
    # a profile without the column (older, GPU, several torch threads) has no such split
    assert _unpaused([{}, {"host_pause_ms": ""}], [0, 1], actual[:2], mean=mean[:2], safe=mean[:2],
                     table_mean=mean[:2], table_safe=mean[:2]) == {}


def test_a_profile_taken_at_another_niceness_is_named_at_serve_time():
    from slonn.scheduler.latency import niceness_mismatch

    rows = [{"worker_nice": "-10"}] * 3
    assert niceness_mismatch(rows, -10) is None
    msg = niceness_mismatch(rows, 0)
    assert "niceness -10, served at 0" in msg and "--worker-nice 0" in msg
    assert niceness_mismatch([{"level": "1.0"}], 0) is None  # older profiles have no such column
    assert "not whole numbers" in niceness_mismatch([{"worker_nice": "-10.0"}], 0)  # a warning, not a crash


def test_a_profile_knows_whether_it_saw_a_gpu():
    from slonn.scheduler.latency import profiled_on_gpu

    assert not profiled_on_gpu([{"gpu": ""}, {"gpu": ""}])  # taken on the CPU: the column is empty
    assert not profiled_on_gpu([{"level": "1.0"}])           # older profiles have no such column
    assert profiled_on_gpu([{"gpu": ""}, {"gpu": "0.25"}])


def test_scores_grade_the_model_and_the_table_the_planner_reads_separately():
    import numpy as np

    from bench.eval_latency import _scores

    actual = np.array([10.0, 20.0])
    out = _scores(mean=actual, safe=actual * 1.2, table_mean=actual * 1.5, table_safe=actual * 0.9, actual=actual)
    assert out["mape_pct"] == 0.0 and out["table_mape_pct"] == 50.0
    assert out["exceed_safe_rate"] == 0.0 and out["exceed_table_safe_rate"] == 1.0


def _drifting_profile(seed: int = 0, n: int = 1600, t_s: bool = True):
    """A profile whose machine speed drifts slowly (an AR(1) over calls 10 ms apart) on top of a known
    cell latency, and a little independent noise: what the recent-slowdown factor is for."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows, dicts = [], []
    drift = 0.0
    for k in range(n):
        drift = 0.9 * drift + rng.normal(0.0, 0.08)
        level, batch = (1.0, 0.25)[k % 2], (1, 4, 16)[k % 3]
        ms = (0.5 + 0.4 * batch * level) * np.exp(drift + rng.normal(0.0, 0.03))
        burn = "0x1" if k < n // 2 else "1x1"
        rows.append(LatencySample(level, batch, 0.0 if burn == "0x1" else 0.5, float(ms)))
        dicts.append({"burn": burn, "intensity": "0" if burn == "0x1" else "1",
                      **({"t_s": f"{k * 0.01 + ms * 1e-3:.4f}"} if t_s else {})})
    return rows, dicts


def test_the_recent_slowdown_follows_a_drifting_machine_and_needs_the_call_times():
    from bench.eval_latency import evaluate

    rows, dicts = _drifting_profile()
    result = evaluate(rows, dicts)
    recent = result["recent_slowdown"]
    assert recent["overall"]["rows"] == result["overall"]["rows"]
    # the drift is most of the scatter: the factor recovers a good part of it
    assert recent["overall"]["mape_pct"] < 0.8 * result["overall"]["mape_pct"]
    assert recent["overall"]["exceed_safe_rate"] <= 0.02
    assert set(recent["per_intensity"]) == {"0x1", "1x1"}
    assert evaluate(*_drifting_profile(t_s=False))["recent_slowdown"] == {}


def test_the_recent_slowdown_does_not_help_without_drift():
    """Independent noise only: the factor chases nothing, and the MAPE with it stays near the model's."""
    import numpy as np

    from bench.eval_latency import evaluate

    rng = np.random.default_rng(1)
    rows, dicts = _drifting_profile()
    rows = [LatencySample(r.level, r.batch_size, r.contention,
                          (0.5 + 0.4 * r.batch_size * r.level) * float(np.exp(rng.normal(0.0, 0.1)))) for r in rows]
    result = evaluate(rows, dicts)
    assert result["recent_slowdown"]["overall"]["mape_pct"] == pytest.approx(result["overall"]["mape_pct"], rel=0.1)


def test_a_rows_factor_comes_only_from_rows_that_finished_before_it_started():
    import numpy as np

    from bench.eval_latency import replay_factors
    from slonn.policy.planner import RecentSlowdown

    # four calls 10 ms apart, the second one 3x slow; listed out of time order
    t_end = np.array([0.031, 0.001, 0.0115, 0.021])
    ms = np.array([1.0, 1.0, 3.0, 1.0])
    f, margin = replay_factors(RecentSlowdown(tau_s=0.06), t_end, ms, np.ones(4))
    assert (margin == 0).all()  # four batches are too few to know a 99th percentile
    assert f[1] == 1.0  # the first call: nothing before it
    assert f[2] == pytest.approx(1.0, abs=0.02)  # the slow call does not see itself
    assert f[3] > 1.3  # the call after it does
    assert 1.0 < f[0] < f[3]  # and the one after that, less
