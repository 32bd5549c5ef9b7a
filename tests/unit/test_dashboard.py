"""docs/grafana-slo.json queries only metrics that ServerMetrics defines (the live /metrics: test_oip.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from slonn.scheduler.metrics import ServerMetrics

DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana-slo.json"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def queried_metrics(path: Path) -> set[str]:
    """Every slonn_* metric name in the dashboard's queries and template variables."""
    dash = json.loads(path.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"]]
    return {name for e in exprs for name in re.findall(r"\bslonn_[a-z_]+\b", e)}


def series_names(families) -> set[str]:
    """The series names metric families can hold (a counter's _total, a histogram's _bucket, ...)."""
    return {f.name + suffix for f in families for suffix in _SUFFIXES.get(f.type, ("",))}


def test_dashboard_queries_exist_in_server_metrics():
    metrics = ServerMetrics()
    metrics.watch_queues(lambda: {("m", "c"): 0})
    queried = queried_metrics(DASHBOARD)
    assert {"slonn_answers_total", "slonn_request_latency_ms_bucket", "slonn_queue_depth",
            "slonn_answers_by_level_total", "slonn_inputs_out_of_range_total"} <= queried
    defined = series_names(metrics.registry.collect())
    assert queried <= defined, sorted(queried - defined)


def test_every_panel_has_a_query():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["panels"] and all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in dash["panels"])
