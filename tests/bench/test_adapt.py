"""`python -m bench.adapt`'s shift detection on synthetic records (no server)."""

from __future__ import annotations

import dataclasses

import numpy as np

from bench.adapt import classes_toml, level_series, prediction_series, shift_time, with_deadline
from slonn.scheduler.config import load_classes
from slonn.scheduler.report import RequestRecord


def records(level_after: float, pred_after: float, start_s: float = 10.0, shift_at_s: float = 11.2):
    out = []
    for k, t in enumerate(np.arange(0.0, 20.0, 0.01)):
        r = RequestRecord(k, "interactive", 25.0, float(t), float(t) + 0.003, "OK")
        after = t >= shift_at_s
        r.level = level_after if after else 0.1
        r.batch_size = 1 + k % 2
        r.predicted_ms = (pred_after if after else 1.0) * r.batch_size
        out.append(r)
    return out


def test_a_level_shift_is_found_at_the_first_bin_that_stays_out():
    recs = records(level_after=0.05, pred_after=1.0)
    ends, levels = level_series(recs, 0.5, 20.0)
    got = shift_time(ends, levels, 10.0, 20.0)
    assert got["shift_s"] == 1.5 and got["quiet_mean_level"] == 0.1  # the bin ending at 11.5 s
    assert got["shifted_mean_level"] < 0.06
    # Predictions are compared within a (level, batch size) cell: cells never seen quiet do not count.
    ends, ratios = prediction_series(recs, 0.5, 20.0, 10.0)
    assert np.isnan(ratios[ends > 12.0]).all()


def test_a_pinned_level_has_no_level_shift_but_the_prediction_shift_is_still_measured():
    recs = records(level_after=0.1, pred_after=2.0)
    ends, levels = level_series(recs, 0.5, 20.0)
    assert shift_time(ends, levels, 10.0, 20.0)["shift_s"] is None
    ends, ratios = prediction_series(recs, 0.5, 20.0, 10.0)
    got = shift_time(ends, ratios, 10.0, 20.0, name="prediction")
    assert got["prediction_shift_s"] == 1.5 and got["quiet_mean_prediction"] == 1.0
    assert abs(got["shifted_mean_prediction"] - 2.0) < 0.1


def test_quiet_overload_is_flagged_only_below_the_threshold():
    from bench.adapt import QUIET_ATTAINMENT_MIN, quiet_overloaded

    def phases(before):
        return {"before": {"interactive": {"attainment": before, "p99_ms": 10.0}}}

    assert quiet_overloaded(phases(QUIET_ATTAINMENT_MIN - 0.01), "interactive")
    assert not quiet_overloaded(phases(QUIET_ATTAINMENT_MIN), "interactive")
    assert not quiet_overloaded(phases(0.5), "standard")  # no such class in the phase: nothing to judge


def test_flag_quiet_overload_sets_the_field_and_warns(caplog):
    from bench.adapt import flag_quiet_overload

    result = {"phases": {"before": {"interactive": {"attainment": 0.5, "p99_ms": 90.0}}}}
    with caplog.at_level("WARNING", logger="bench.adapt"):
        assert flag_quiet_overload(result, "interactive", 300.0)
    assert result["quiet_overloaded"] is True
    assert "50.0% of interactive" in caplog.text and "300 req/s" in caplog.text
    quiet = {"phases": {"before": {"interactive": {"attainment": 1.0, "p99_ms": 9.0}}}}
    assert not flag_quiet_overload(quiet, "interactive", 100.0) and quiet["quiet_overloaded"] is False


def test_the_band_is_taken_just_before_the_start_not_over_an_earlier_step():
    """A learner settling early in the quiet phase (a step from 1.0 to 0.6 at 5 s) must not widen the band
    so much that a doubling at the co-runner's start goes unseen."""
    ends = np.arange(0.5, 20.01, 0.5)
    means = np.where(ends <= 5.0, 1.0, 0.6)
    means = np.where(ends > 10.0, 1.2, means)  # the co-runner starts at 10 s: predictions x2 at once
    assert shift_time(ends, means, 10.0, 20.0, name="prediction")["prediction_shift_s"] == 0.5
    assert shift_time(ends, means, 10.0, 20.0, name="prediction", baseline_s=10.0)["prediction_shift_s"] is None


def test_a_deadline_override_changes_that_class_alone_and_round_trips_through_toml(tmp_path):
    packaged = load_classes(None)
    same, none = with_deadline(packaged, "interactive", None, tmp_path / "none.toml")
    assert same is packaged and none is None and not (tmp_path / "none.toml").exists()
    changed, out = with_deadline(packaged, "interactive", 7.5, tmp_path / "c.toml")
    assert packaged["interactive"].latency_ms != 7.5  # the caller's dict is left alone
    written = load_classes(out)
    assert written == changed  # what the server reads is what the client judges by
    assert written["interactive"].latency_ms == 7.5 != packaged["interactive"].latency_ms
    assert {n: c for n, c in written.items() if n != "interactive"} == {
        n: c for n, c in packaged.items() if n != "interactive"}
    before = packaged["interactive"]
    assert dataclasses.replace(written["interactive"], latency_ms=before.latency_ms) == before


def test_per_model_settings_round_trip_through_toml(tmp_path):
    from slonn.scheduler.config import SLOClassConfig, load_classes

    override = SLOClassConfig("c", latency_ms=40.0, min_accuracy=0.0, max_accuracy_drop=0.01)
    classes = {"c": SLOClassConfig("c", latency_ms=20.0, min_accuracy=0.9, overrides=(("my.model", override),))}
    (tmp_path / "c.toml").write_text(classes_toml(classes))
    assert load_classes(tmp_path / "c.toml") == classes
