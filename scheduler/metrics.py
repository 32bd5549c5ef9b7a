"""Prometheus metrics (prometheus-client) and a periodic one-line summary in the log.

`slonn serve --metrics-port N` serves them on host:N/metrics (any other path: 404). docs/grafana-slo.json
draws the SLO dashboard from these names; tests/unit/test_metrics.py checks that every metric it queries exists.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

_MS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
UNKNOWN = "_unknown"
"""The model / slo_class label of an answer to a request naming a model or class the server does not have."""
IN_SLO, LATE = "in_slo", "late"
"""The ``result`` of an OK answer in slonn_answers_total; a rejected one carries its gRPC status name."""


LABELLED = ("answers", "late", "batches", "batch_size", "exec_ms", "under_predicted", "queue_ms", "worker_deaths",
            "retried", "results", "latency_ms", "levels", "out_of_range", "node_batches", "node_table_ms")
"""The labelled metrics of :class:`ServerMetrics`, each wrapped in :class:`CachedLabels`."""


class CachedLabels:
    """A labelled metric whose child per label values is looked up once.

    prometheus_client's ``labels()`` validates the values and takes a lock on every call; the dispatcher
    calls it a few times per request and per batch, with a handful of distinct (model, class, outcome)
    combinations. Everything but ``labels`` is the metric's own.
    """

    __slots__ = ("_children", "metric")

    def __init__(self, metric) -> None:
        self.metric = metric
        self._children: dict[tuple, object] = {}

    def labels(self, *values):
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child

    def __getattr__(self, name: str):
        return getattr(self.metric, name)


class ServerMetrics:
    """Counters for every answer and batch, on a registry of its own (several servers per process in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.answers = Counter("slonn_requests", "Requests answered, by outcome (OK or a gRPC status name)",
                               ["model", "slo_class", "outcome"], registry=r)
        self.late = Counter("slonn_late_answers", "OK answers delivered after their deadline",
                            ["model", "slo_class"], registry=r)
        self.results = Counter("slonn_answers", "Every answer: in_slo, late, or rejected (result = the gRPC "
                               "status name, e.g. DEADLINE_EXCEEDED, INVALID_ARGUMENT, NOT_FOUND)",
                               ["model", "slo_class", "result"], registry=r)
        self.latency_ms = Histogram("slonn_request_latency_ms", "Server time of OK answers, admission to answer "
                                    "(ms)", ["model", "slo_class"], registry=r, buckets=_MS_BUCKETS)
        self.levels = Counter("slonn_answers_by_level", "OK answers by the level their batch ran at",
                              ["model", "slo_class", "level"], registry=r)
        self.out_of_range = Counter("slonn_inputs_out_of_range", "Requests served with features far outside the "
                                    "model's training range (its input contract)", ["model"], registry=r)
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
        self.retried = Counter("slonn_requests_requeued", "Requests queued again after their worker died",
                               ["model", "slo_class"], registry=r)
        self.unauthenticated = Counter("slonn_unauthenticated", "Calls refused for a missing or wrong bearer token "
                                       "(gRPC UNAUTHENTICATED, HTTP 401)", ["protocol"], registry=r)
        self.node_batches = Counter("slonn_node_batches", "Batches run per node (workers on several nodes)",
                                    ["node"], registry=r)
        self.node_table_ms = Gauge("slonn_node_table_ms", "Per node's own latency table (workers on several "
                                   "nodes): predicted mean ms of a full batch of the fastest level, quiet",
                                   ["model", "node"], registry=r)
        for name in LABELLED:
            setattr(self, name, CachedLabels(getattr(self, name)))
        self._httpd: ThreadingWSGIServer | None = None

    def served(self, model: str, slo_class: str, late: bool, latency_ms: float, level: float) -> None:
        """One OK answer: in its SLO or late, its server time and the level it ran at."""
        self.answers.labels(model, slo_class, "OK").inc()
        self.results.labels(model, slo_class, LATE if late else IN_SLO).inc()
        if late:
            self.late.labels(model, slo_class).inc()
        self.latency_ms.labels(model, slo_class).observe(latency_ms)
        self.levels.labels(model, slo_class, f"{level:g}").inc()

    def reject(self, model: str, slo_class: str, code: str, n: int = 1) -> None:
        """``n`` requests answered with the gRPC status ``code`` (its name)."""
        self.answers.labels(model, slo_class, code).inc(n)
        self.results.labels(model, slo_class, code).inc(n)

    def watch_queues(self, lengths: Callable[[], dict[tuple[str, str], int]]) -> None:
        """Export ``lengths()`` ({(model, slo_class): queued requests}) as slonn_queue_depth at each scrape."""
        self.registry.register(_QueueDepth(lengths))

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on host:port in a thread (404 elsewhere); returns the bound port."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ, start_response) -> Iterable[bytes]:
            if environ.get("PATH_INFO", "") in ("/metrics", "/metrics/"):
                return metrics_app(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: the metrics are at /metrics\n"]

        self._httpd = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
        threading.Thread(target=self._httpd.serve_forever, name="slonn-metrics", daemon=True).start()
        bound = self._httpd.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

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


class _QueueDepth:
    """A collector read at scrape time: the queues' lengths are the scheduler's, not copied on every change."""

    def __init__(self, lengths: Callable[[], dict[tuple[str, str], int]]) -> None:
        self.lengths = lengths

    def collect(self):
        family = GaugeMetricFamily("slonn_queue_depth", "Requests waiting in the queue of a model and class",
                                   labels=["model", "slo_class"])
        for (model, slo_class), n in sorted(self.lengths().items()):
            family.add_metric([model, slo_class], n)
        yield family


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        """Scrapes are not news: no line per request on stderr."""

