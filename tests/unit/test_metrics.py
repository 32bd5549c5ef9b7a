"""ServerMetrics: labelled children looked up once, counted on the server's own registry."""

from __future__ import annotations

from slonn.scheduler.metrics import LABELLED, ServerMetrics


def test_labels_returns_one_child_per_label_values_and_counts_reach_the_registry():
    m = ServerMetrics()
    first = m.answers.labels("mlp", "standard", "OK")
    assert m.answers.labels("mlp", "standard", "OK") is first
    assert m.answers.labels("mlp", "standard", "UNAVAILABLE") is not first
    first.inc()
    m.answers.labels("mlp", "standard", "OK").inc()
    m.queue_ms.labels("standard").observe(3.0)
    get = m.registry.get_sample_value
    assert get("slonn_requests_total", {"model": "mlp", "slo_class": "standard", "outcome": "OK"}) == 2.0
    assert get("slonn_queue_ms_count", {"slo_class": "standard"}) == 1.0
    assert m.summary()["answers"] == {"OK": 2, "UNAVAILABLE": 0}


def test_every_labelled_metric_is_cached_and_keeps_its_own_attributes():
    m = ServerMetrics()
    for name in LABELLED:
        metric = getattr(m, name)
        assert metric.labels(*["x"] * len(metric._labelnames)) is metric.labels(*["x"] * len(metric._labelnames))
