"""OnlineLearner: refit on known-shape data, live samples outweigh the profile, window eviction."""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import pytest

from slonn.policy.latency_model import LatencySample
from slonn.policy.learner import LearnerConfig, OnlineLearner
from slonn.policy.table import LatencyTable

LEVELS = (1.0, 0.5, 0.25, 0.1, 0.05)
BATCHES = (1, 2, 4, 8, 16, 32, 64)


def true_ms(level, batch, contention):
    return 0.5 + 0.1 * batch * level * (1 + contention)


def profile_rows(scale: float = 1.0, seed: int = 0) -> list[LatencySample]:
    rng = np.random.default_rng(seed)
    return [LatencySample(lv, b, c, scale * true_ms(lv, b, c) * (1 + 0.03 * rng.standard_normal()))
            for lv in LEVELS for b in BATCHES for c in (0.0, 0.5, 1.0) for _ in range(3)]


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(config: LearnerConfig = LearnerConfig(), rows=None, **kw) -> OnlineLearner:
    return OnlineLearner(profile_rows() if rows is None else rows, LEVELS, 64, (0.25, 0.75), config=config, **kw)


def test_initial_fit_recovers_known_shape():
    learner = make()
    model, table = learner.model, learner.table
    for lv in LEVELS:
        for b in (1, 5, 16, 40, 64):
            assert float(model.predict_mean(lv, b, 0.5)) == pytest.approx(true_ms(lv, b, 0.5), rel=0.1)
    assert isinstance(table, LatencyTable)
    assert table.levels == LEVELS and table.max_batch == 64
    assert np.all(table.safe_ms >= table.mean_ms)
    assert np.all(np.diff(table.safe_ms, axis=2) >= 0)


def test_table_lookup_equals_model_prediction_at_grid_points():
    learner = make()
    table, model = learner.table, learner.model
    mean_points = model.bucket_points(table.contention_edges, "mean")
    for bucket, c in enumerate(model.bucket_points(table.contention_edges, "safe")):
        for b in BATCHES:  # level 1.0: the fitted surface is monotone there, so no envelope applies
            assert table.safe(bucket, 0, b) == pytest.approx(float(model.predict_safe(1.0, b, c)), rel=1e-9)
            assert table.mean(bucket, 0, b) == pytest.approx(float(model.predict_mean(1.0, b, mean_points[bucket])),
                                                             rel=1e-9)
        for li, lv in enumerate(LEVELS):
            for b in BATCHES:
                assert table.safe(bucket, li, b) >= float(model.predict_safe(lv, b, c)) * (1 - 1e-9)


def test_live_samples_outweigh_the_profile_after_a_load_change():
    clock = FakeClock()
    published = []
    learner = make(LearnerConfig(live_weight=20.0), clock=clock, on_table=published.append)
    before = learner.table.mean(0, 0, 16)
    for s in profile_rows(scale=2.0, seed=1)[::2]:  # the machine got 2x slower, contention signal unchanged
        learner.observe(s)
    assert learner.pending > 0
    table = learner.refit_now()
    assert table is learner.table and published[-1] is table
    assert learner.pending == 0
    assert table.mean(0, 0, 16) > 1.6 * before


def test_window_evicts_by_count_and_by_age():
    clock = FakeClock()
    learner = make(LearnerConfig(max_live=5, max_age_s=10.0), clock=clock)
    for i in range(8):
        learner.observe(LatencySample(1.0, 1, 0.0, 1.0 + i))
    assert [s.exec_ms for s in learner.live_samples()] == [4.0, 5.0, 6.0, 7.0, 8.0]
    clock.t += 5.0
    learner.observe(LatencySample(1.0, 1, 0.0, 9.0))
    clock.t += 6.0  # the first five are now 11 s old, the last one 6 s
    assert [s.exec_ms for s in learner.live_samples()] == [9.0]
    assert [s.exec_ms for s in learner.live_samples(now_s=clock.t + 100)] == []


def test_training_set_weights_live_rows():
    learner = make(LearnerConfig(live_weight=7.0), clock=FakeClock())
    learner.observe(LatencySample(0.5, 4, 0.0, 1.0))
    rows, weights = learner.training_set()
    assert len(rows) == len(weights) == len(profile_rows()) + 1
    assert weights[-1] == 7.0 and weights[0] == 1.0


def test_cold_start_without_profile_keeps_initial_table_until_enough_rows():
    initial = LatencyTable.constant(LEVELS, 64, per_item_ms=2.0)
    learner = make(LearnerConfig(min_rows=20), rows=[], initial_table=initial, clock=FakeClock())
    assert learner.table is initial and learner.model is None
    assert learner.refit_now() is None
    for s in profile_rows()[:: 3]:
        learner.observe(s)
    assert learner.refit_now() is not None and learner.table is not initial


def test_observe_is_thread_safe():
    learner = make(LearnerConfig(max_live=10_000), clock=FakeClock())
    sample = LatencySample(1.0, 2, 0.0, 1.0)

    def feed():
        for _ in range(1000):
            learner.observe(sample)

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(learner.live_samples()) == 4000 and learner.pending == 4000


def test_background_thread_refits_and_stops():
    done = threading.Event()
    learner = make(LearnerConfig(refit_interval_s=0.01, quiet_refit_s=0.01))
    assert learner.refits == 1  # the synchronous start-up fit
    learner.on_table = lambda t: done.set()
    learner.observe(LatencySample(1.0, 2, 0.0, 1.0))
    with learner:
        assert done.wait(10.0)  # an event, not a timing assertion
    assert learner.refits >= 2 and learner.pending == 0


def test_refit_in_a_child_process_publishes_the_same_table_as_in_the_thread():
    done = threading.Event()
    pids: list[int] = []
    clock = FakeClock()
    learner = make(LearnerConfig(refit_interval_s=0.01, drift_samples=3), clock=clock)
    learner.on_table = lambda t: done.set()
    for b in (2, 4, 8):
        learner.observe(LatencySample(0.5, b, 0.2, 3.0 * true_ms(0.5, b, 0.2)))
    gone: list[int] = []
    learner.start(process=True, on_spawn=pids.append, on_exit=gone.append)
    try:
        assert learner.wait_started(120.0)
        assert len(pids) == 1  # the child is up (and known to the monitor) when wait_started returns
        assert done.wait(120.0)  # spawning the child imports scikit-learn: an event, not a timing assertion
    finally:
        learner.stop()
    assert pids and pids[0] != os.getpid()
    assert gone == pids  # stop() ends the child and says so (the contention monitor forgets its pid)
    child_table = learner.table
    local = learner.refit_now()  # same rows, fitted here
    np.testing.assert_allclose(child_table.mean_ms, local.mean_ms, rtol=1e-9)
    np.testing.assert_allclose(child_table.safe_ms, local.safe_ms, rtol=1e-9)


def test_a_thread_left_spawning_by_stop_cannot_mark_a_later_start_as_started(monkeypatch):
    import slonn.policy.learner as learner_module

    monkeypatch.setattr(learner_module, "STOP_JOIN_S", 0.05)
    gates = [threading.Event(), threading.Event()]
    calls = []

    def slow_spawn(self, stop):  # stands in for a child that takes long to start
        gate = gates[len(calls)]
        calls.append(stop)
        gate.wait(10.0)

    monkeypatch.setattr(OnlineLearner, "_spawn_child", slow_spawn)
    learner = make(LearnerConfig(refit_interval_s=0.01))
    learner.start(process=True)
    assert not learner.wait_started(0.05)
    learner.stop()  # gives up on the thread: it is still "spawning"
    learner.start(process=True)
    gates[0].set()  # the old thread's spawn ends now
    assert not learner.wait_started(0.2)  # ...but this start's child is not up yet
    assert calls[0].is_set() and not calls[1].is_set()  # each thread has its own stop event
    gates[1].set()
    assert learner.wait_started(10.0)
    learner.stop()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="live_weight"):
        LearnerConfig(live_weight=0.5)


def test_a_refit_is_due_at_once_on_drift_and_only_after_the_quiet_interval_otherwise():
    clock = FakeClock()
    learner = make(LearnerConfig(refit_interval_s=0.5, quiet_refit_s=10.0, drift=0.15, drift_samples=5),
                   clock=clock)
    assert not learner.refit_due()  # nothing new
    # Samples the published table already predicts: no refit until the quiet interval has passed.
    for b in (1, 2, 4, 8, 16, 32):
        learner.observe(LatencySample(0.5, b, 0.0, true_ms(0.5, b, 0.0)))
    clock.t += 9.0
    assert learner.pending == 6 and not learner.refit_due()
    clock.t += 1.0
    assert learner.refit_due()
    learner.refit_now()
    assert not learner.refit_due()
    # The machine got 2x slower: due as soon as enough samples say so, long before the quiet interval.
    for i, b in enumerate((1, 2, 4, 8, 16)):
        assert not learner.refit_due()  # fewer than drift_samples so far
        learner.observe(LatencySample(0.25, b, 0.5, 2.0 * true_ms(0.25, b, 0.5)))
    clock.t += 0.5
    assert learner.refit_due()
    learner.refit_now()
    assert not learner.refit_due() and learner.pending == 0


def test_samples_the_table_cannot_place_are_kept_but_are_no_drift_evidence():
    clock = FakeClock()
    learner = make(LearnerConfig(quiet_refit_s=10.0, drift_samples=1), clock=clock)
    learner.observe(LatencySample(0.3, 4, 0.0, 50.0))  # a level the model does not have
    learner.observe(LatencySample(0.5, 500, 0.0, 50.0))  # beyond max_batch
    assert learner.pending == 2 and len(learner.live_samples()) == 2
    assert not learner.refit_due()


def test_drift_after_a_long_quiet_stretch_is_seen_within_a_few_dozen_batches():
    clock = FakeClock()
    learner = make(LearnerConfig(quiet_refit_s=1e6, drift=0.15, drift_samples=5), clock=clock)
    for i in range(2000):  # a long stretch the table predicts well
        b = (1, 2, 4, 8)[i % 4]
        learner.observe(LatencySample(0.5, b, 0.0, true_ms(0.5, b, 0.0)))
    assert not learner.refit_due()
    for i in range(40):  # then 40 batches at 1.6x: a cumulative mean since the refit would still read ~1%
        b = (1, 2, 4, 8)[i % 4]
        learner.observe(LatencySample(0.5, b, 0.0, 1.6 * true_ms(0.5, b, 0.0)))
    assert learner.refit_due()


def _tail_without_mean_shift(learner: OnlineLearner) -> None:
    """Batches that overrun the safe bound every other time, with fast ones between: the mean hardly moves."""
    table = learner.table
    for i in range(8):
        b = (1, 2, 4, 8)[i % 4]
        cell = (table.bucket(0.0), table.level_index(0.5), b)
        ms = 1.05 * table.safe(*cell) if i % 2 else 0.8 * table.mean(*cell)
        learner.observe(LatencySample(0.5, b, 0.0, ms))


def test_a_growing_tail_is_drift_even_when_the_mean_holds():
    clock = FakeClock()
    config = LearnerConfig(quiet_refit_s=1e6, drift=0.15, drift_samples=5)
    learner = make(config, clock=clock)
    _tail_without_mean_shift(learner)
    assert abs(learner._drift) < np.log1p(0.15)  # the mean alone would not call for a refit
    assert learner.refit_due()
    learner.refit_now()
    assert not learner.refit_due()
    blind = make(LearnerConfig(quiet_refit_s=1e6, drift=0.15, drift_samples=5, exceed_trigger=1.0), clock=clock)
    _tail_without_mean_shift(blind)
    assert not blind.refit_due()
    with pytest.raises(ValueError, match="exceed_trigger"):
        LearnerConfig(exceed_trigger=0.0)


def _batches_at(learner: OnlineLearner, contention: float, t0: float, seconds: float) -> float:
    """Batches 10 ms apart at ``contention`` from ``t0`` for ``seconds``, which ran exactly as the truth (and so
    the table) says; returns the time of the last."""
    n = int(round(seconds / 0.01))
    for i in range(n):
        b = (1, 2, 4, 8)[i % 4]
        learner.observe(LatencySample(0.5, b, contention, true_ms(0.5, b, contention)), now_s=t0 + i * 0.01)
    return t0 + (n - 1) * 0.01


def test_a_move_of_the_contention_calls_for_a_refit_even_when_the_table_predicts_well():
    from slonn.policy.learner import CONTENTION_MIN_GAP_S

    config = LearnerConfig(quiet_refit_s=1e6, drift=0.15, drift_samples=5)
    learner = make(config, clock=FakeClock())
    t = _batches_at(learner, 0.2, 100.0, 1.0)
    learner.refit_now(now_s=t)  # the learner has seen batches at 0.2
    t = _batches_at(learner, 0.5, t, 10.0)  # the quiet signal wanders by 0.3: within the trigger's 0.5
    assert abs(learner._drift) < np.log1p(0.15) and learner._exceed <= config.exceed_trigger
    assert not learner.refit_due(now_s=t)
    t = _batches_at(learner, 1.0, t, 2.5)  # a co-runner: +0.5 for 2.5 s; mean and tail as predicted
    assert abs(learner._drift) < np.log1p(0.15) and learner._exceed <= config.exceed_trigger
    assert learner.refit_due(now_s=t)
    learner.refit_now(now_s=t)
    t = _batches_at(learner, 1.0, t, 3.5)  # past the gap: from 0.2 it would have moved by 0.77
    assert not learner.refit_due(now_s=t)  # measured from where it was at the last refit
    # a jump right after a refit waits until the refit is CONTENTION_MIN_GAP_S old
    jump = make(config, clock=FakeClock())
    t0 = _batches_at(jump, 0.0, 100.0, 1.0)
    jump.refit_now(now_s=t0)
    t = _batches_at(jump, 1.0, t0, 2.0)  # 2 s at +1: the average moved by 1 - e^-1 = 0.63
    assert t - t0 < CONTENTION_MIN_GAP_S and not jump.refit_due(now_s=t)
    assert jump.refit_due(now_s=t0 + CONTENTION_MIN_GAP_S)
    fresh = make(config, clock=FakeClock())  # no batch before the start-up fit: the first batches are the base
    t = _batches_at(fresh, 0.0, 100.0, 3.0)
    assert not fresh.refit_due(now_s=t)
    t = _batches_at(fresh, 1.0, t, 2.0)
    assert fresh.refit_due(now_s=t)
    off = make(LearnerConfig(quiet_refit_s=1e6, drift=0.15, drift_samples=5, contention_trigger=math.inf),
               clock=FakeClock())
    t = _batches_at(off, 0.2, 100.0, 1.0)
    off.refit_now(now_s=t)
    t = _batches_at(off, 1.0, t, 5.0)
    assert not off.refit_due(now_s=t)
    with pytest.raises(ValueError, match="contention_trigger"):
        LearnerConfig(contention_trigger=0.0)


def test_a_failed_refit_keeps_the_evidence_that_asked_for_it(monkeypatch):
    import slonn.policy.learner as learner_module

    clock = FakeClock()
    learner = make(LearnerConfig(quiet_refit_s=1e6, drift=0.15, drift_samples=5), clock=clock)
    old, refits = learner.table, learner.refits
    for b in (1, 2, 4, 8, 16, 32):  # the machine got 2x slower
        learner.observe(LatencySample(0.5, b, 0.0, 2.0 * true_ms(0.5, b, 0.0)))
    assert learner.refit_due()
    real_fit = learner_module.fit_table

    def broken(*args, **kwargs):
        raise RuntimeError("the fit failed")

    monkeypatch.setattr(learner_module, "fit_table", broken)
    with pytest.raises(RuntimeError):
        learner.refit_now()
    assert learner.table is old and learner.refits == refits
    assert learner.pending == 6 and learner.refit_due()  # still due: the next check tries again
    monkeypatch.setattr(learner_module, "fit_table", real_fit)
    assert learner.refit_now() is learner.table is not old
    assert learner.pending == 0 and not learner.refit_due()


def test_batches_that_finish_during_a_fit_are_not_evidence_against_the_new_table(monkeypatch):
    import slonn.policy.learner as learner_module

    clock = FakeClock()
    learner = make(LearnerConfig(quiet_refit_s=1e6, drift=0.15, drift_samples=3), clock=clock)
    for b in (1, 2, 4, 8, 16, 32):
        learner.observe(LatencySample(0.5, b, 0.0, 2.0 * true_ms(0.5, b, 0.0)))
    real_fit = learner_module.fit_table

    def fit_while_batches_finish(*args, **kwargs):
        for b in (1, 2, 4, 8):  # judged against the old table, which these overrun
            learner.observe(LatencySample(0.5, b, 0.0, 2.0 * true_ms(0.5, b, 0.0)))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(learner_module, "fit_table", fit_while_batches_finish)
    learner.refit_now()
    assert learner.pending == 4  # kept for the next fit ...
    assert not learner.refit_due()  # ... but no reason for one on their own


@pytest.mark.parametrize("exec_ms, contention", [(float("nan"), 0.0), (float("inf"), 0.0), (0.0, 0.0),
                                                 (-1.0, 0.0), (1.0, float("nan")), (1.0, float("inf"))])
def test_a_sample_that_is_not_a_finite_measurement_is_dropped(exec_ms, contention):
    clock = FakeClock()
    learner = make(LearnerConfig(quiet_refit_s=10.0), clock=clock)
    learner.observe(LatencySample(0.5, 4, contention, exec_ms))
    learner.observe(LatencySample(0.5, 4, 0.0, 2.0 * true_ms(0.5, 4, 0.0)))
    assert learner.dropped == 1 and learner.pending == 1 and len(learner.live_samples()) == 1
    clock.t += 10.0
    assert learner.refit_due() and learner.refit_now() is learner.table  # the fit still works


def test_live_batch_sizes_do_not_become_knots_of_the_model():
    clock = FakeClock()
    learner = make(LearnerConfig(quiet_refit_s=10.0), clock=clock)
    for b in (3, 5, 6, 7, 9, 11, 13, 17):  # sizes the profile never ran, as live traffic does
        learner.observe(LatencySample(0.5, b, 0.0, true_ms(0.5, b, 0.0)))
    learner.refit_now()
    assert np.array_equal(learner.model._feat.batch_knots, np.log2(BATCHES))
    assert learner.model.predict_mean(0.5, 5, 0.0) == pytest.approx(true_ms(0.5, 5, 0.0), rel=0.1)
    cold = make(LearnerConfig(min_rows=12), rows=[])  # no profile: the live rows are all there is
    for b in (1, 3, 5, 8) * 3:
        cold.observe(LatencySample(0.5, b, 0.0, true_ms(0.5, b, 0.0)))
    cold.refit_now()
    assert np.array_equal(cold.model._feat.batch_knots, np.log2([1, 3, 5, 8]))


def test_the_first_batch_during_a_fit_stays_the_contention_triggers_base(monkeypatch):
    import slonn.policy.learner as learner_module

    learner = make(LearnerConfig(quiet_refit_s=1e6), clock=FakeClock())  # the start-up fit saw no batch
    real_fit = learner_module.fit_table

    def fit_while_the_first_batch_finishes(*args, **kwargs):
        learner.observe(LatencySample(0.5, 1, 0.2, true_ms(0.5, 1, 0.2)), now_s=100.0)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(learner_module, "fit_table", fit_while_the_first_batch_finishes)
    learner.refit_now(now_s=100.0)
    monkeypatch.setattr(learner_module, "fit_table", real_fit)
    t = _batches_at(learner, 1.0, 100.01, 4.0)  # a co-runner from then on: +0.8 from the base
    assert learner.refit_due(now_s=t)
