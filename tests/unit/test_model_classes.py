"""Models of different accuracy side by side: a class's floor relative to each model, and per-model overrides."""

from __future__ import annotations

import pytest

from slonn.policy.planner import SLOAwarePolicy
from slonn.scheduler.config import SLOClassConfig
from slonn.scheduler.core import Scheduler
from slonn.scheduler.errors import FailedPrecondition

MODELS = {"digits": (0.98, 0.975, 0.95), "tabular": (0.80, 0.796, 0.70)}


def scheduler(*classes: SLOClassConfig) -> Scheduler:
    return Scheduler(MODELS, {c.name: c for c in classes}, SLOAwarePolicy())


def test_relative_floor_follows_each_models_dense_accuracy():
    sched = scheduler(SLOClassConfig("near-dense", latency_ms=50, max_accuracy_drop=0.005))
    assert sched.make_request("digits", "near-dense", 0.0).pending.min_accuracy == pytest.approx(0.975)
    assert sched.make_request("tabular", "near-dense", 0.0).pending.min_accuracy == pytest.approx(0.795)


def test_an_absolute_floor_above_a_model_is_refused_unless_overridden_for_it():
    strict = SLOClassConfig("strict", latency_ms=50, min_accuracy=0.95)
    with pytest.raises(FailedPrecondition, match="model 'tabular'"):
        scheduler(strict).make_request("tabular", "strict", 0.0)
    override = SLOClassConfig("strict", latency_ms=80, min_accuracy=0.7, max_queue=3)
    sched = scheduler(SLOClassConfig("strict", latency_ms=50, min_accuracy=0.95,
                                     overrides=(("tabular", override),)))
    req = sched.make_request("tabular", "strict", 1.0)
    assert req.pending.min_accuracy == pytest.approx(0.7)
    assert req.pending.deadline_s == pytest.approx(1.08)  # the override's latency_ms
    assert sched._queues["tabular"]["strict"].max_len == 3
    assert sched.make_request("digits", "strict", 1.0).pending.deadline_s == pytest.approx(1.05)
