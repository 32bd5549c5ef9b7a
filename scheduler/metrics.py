"""Prometheus metrics (prometheus-client) and a periodic one-line summary in the log.

`slonn serve --metrics-port N` serves them on 127.0.0.1:N/metrics.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_MS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class ServerMetrics:
    """Counters for every answer and batch, on a registry of its own (several servers per process in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.answers = Counter("slonn_requests", "Requests answered, by outcome (OK or a gRPC status name)",
                               ["model", "slo_class", "outcome"], registry=r)
        self.late = Counter("slonn_late_answers", "OK answers delivered after their deadline",
                            ["model", "slo_class"], registry=r)
        self.batches = Counter("slonn_batches", "Batches run, by level", ["model", "level"], registry=r)
        self.batch_size = Histogram("slonn_batch_size", "Requests per batch", ["model"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.exec_ms = Histogram("slonn_exec_ms", "Measured batch execution time (ms)", ["model", "level"],
                                 registry=r, buckets=_MS_BUCKETS)
        self.under_predicted = Counter("slonn_under_predicted_batches",
                                       "Batches whose measured exec time exceeded the safe prediction",
                                       ["model"], registry=r)
        self.queue_ms = Histogram("slonn_queue_ms", "Time from arrival to batch start (ms)", ["slo_class"],
                                  registry=r, buckets=_MS_BUCKETS)
        self.contention = Gauge("slonn_contention", "Latest contention signal (others' runnable tasks per CPU)",
                                registry=r)
        self.inflight = Gauge("slonn_inflight", "Admitted requests not yet answered", registry=r)
        self.worker_deaths = Counter("slonn_batches_lost_to_worker_death",
                                     "Batches whose worker died while running them", ["model"], registry=r)
        self.out_of_range = Counter("slonn_out_of_range_inputs",
                                    "Requests served with features far outside the model's training range",
                                    ["model"], registry=r)
        self.retried = Counter("slonn_requests_requeued", "Requests queued again after their worker died",
                               ["model", "slo_class"], registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, port)

    def summary(self) -> dict:
        """Totals by outcome and by level, for the periodic log line."""
        outcomes: dict[str, float] = {}
        levels: dict[str, float] = {}
        for metric in self.registry.collect():
            for s in metric.samples:
                if s.name == "slonn_requests_total":
                    outcomes[s.labels["outcome"]] = outcomes.get(s.labels["outcome"], 0) + s.value
                elif s.name == "slonn_batches_total":
                    levels[s.labels["level"]] = levels.get(s.labels["level"], 0) + s.value
        return {"answers": {k: int(v) for k, v in outcomes.items()},
                "batches_by_level": {k: int(v) for k, v in levels.items()}}
