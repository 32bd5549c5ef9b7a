"""Per-request records and the per-class SLO summary shared by live replay and the simulator."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import ClassVar

import numpy as np


class RequestRecord:
    """One request as the load generator (or the simulator) saw it.

    A plain class with slots, as :class:`policy.planner.Pending` is: the simulator builds one per request, and
    under mypyc a native ``__init__`` costs a fraction of the interpreted one ``@dataclass`` generates (that
    one takes a tenth of a simulation's time)."""

    FIELDS: ClassVar[tuple[str, ...]] = ("index", "slo_class", "deadline_ms", "send_s", "answer_s", "status", "level",
                          "batch_size", "correct", "late", "exec_ms", "predicted_ms", "queue_ms", "server_ms",
                          "detail", "scheduled_s")
    """The fields, in order (the CSV's columns before ``latency_ms``)."""
    __slots__ = FIELDS

    def __init__(self, index: int, slo_class: str, deadline_ms: float, send_s: float,
                 answer_s: float = float("nan"), status: str = "UNANSWERED", level: float = float("nan"),
                 batch_size: int = 0, correct: bool | None = None, late: bool = False,
                 exec_ms: float = float("nan"), predicted_ms: float = float("nan"), queue_ms: float = float("nan"),
                 server_ms: float = float("nan"), detail: str = "", scheduled_s: float | None = None) -> None:
        self.index = index
        self.slo_class = slo_class
        self.deadline_ms = deadline_ms
        self.send_s = send_s
        self.answer_s = answer_s
        self.status = status
        """"OK" or a grpc.StatusCode name."""
        self.level = level
        self.batch_size = batch_size
        self.correct = correct
        self.late = late
        """The server served it knowing it would miss its deadline (a class with ``on_late = "serve"``): the
        response's ``late`` flag, which the simulator sets from the same plan."""
        self.exec_ms = exec_ms
        self.predicted_ms = predicted_ms
        self.queue_ms = queue_ms
        """Server-side wait from admission to batch start."""
        self.server_ms = server_ms
        """Time inside the server's handler; latency_ms minus this is what the transport and the client cost."""
        self.detail = detail
        """The error's message when the status is not OK (who answered, and why)."""
        self.scheduled_s = scheduled_s
        """When the trace says it should have been sent (live replay: send_s - scheduled_s is the sender's lag)."""

    def __reduce__(self) -> tuple:
        """Pickle through the constructor (``slonn reliability``'s client processes send records back; a
        compiled class has no instance ``__dict__`` for pickle's default)."""
        return RequestRecord, tuple(getattr(self, name) for name in RequestRecord.FIELDS)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in RequestRecord.FIELDS}

    def __repr__(self) -> str:
        return "RequestRecord(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"

    @property
    def latency_ms(self) -> float:
        return (self.answer_s - self.send_s) * 1e3

    @property
    def on_time(self) -> bool:
        return self.status == "OK" and self.latency_ms <= self.deadline_ms


def _pct(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if len(values) else None


def summarize(records: list[RequestRecord], duration_s: float) -> dict:
    """Per class and overall: sent, attainment, goodput, served accuracy, latency percentiles, levels, rejects."""
    by_class: dict[str, list[RequestRecord]] = {}
    for r in records:
        by_class.setdefault(r.slo_class, []).append(r)
    out = {name: _summary(rs, duration_s) for name, rs in sorted(by_class.items())}
    out["all"] = _summary(records, duration_s)
    return out


def _summary(rs: list[RequestRecord], duration_s: float) -> dict:
    ok = [r for r in rs if r.status == "OK"]
    on_time = sum(r.on_time for r in rs)
    lat = np.asarray([r.latency_ms for r in ok])
    checked = [r.correct for r in ok if r.correct is not None]
    levels = Counter(r.level for r in ok)
    return {
        "sent": len(rs),
        "answered_ok": len(ok),
        "within_deadline": on_time,
        "attainment": round(on_time / len(rs), 4) if rs else None,
        "goodput_per_s": round(on_time / duration_s, 2) if duration_s > 0 else None,
        "served_accuracy": round(float(np.mean(checked)), 4) if checked else None,
        "p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95), "p99_ms": _pct(lat, 99),
        "levels": {f"{k:g}": v for k, v in sorted(levels.items(), reverse=True)},
        "mean_batch": round(float(np.mean([r.batch_size for r in ok])), 2) if ok else None,
        "errors": dict(Counter(r.status for r in rs if r.status != "OK")),
        # Never answered by the server: still pending, or the client's own timeout fired.
        "unanswered": sum(r.status in ("UNANSWERED", "CLIENT_TIMEOUT") for r in rs),
    }


def write_csv(records: list[RequestRecord], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*RequestRecord.FIELDS, "latency_ms"])
        w.writeheader()
        for r in records:
            w.writerow({**r.as_dict(), "latency_ms": r.latency_ms})


def _optional(text: str, parse):
    return parse(text) if text not in ("", "None") else None


def read_csv(path: Path) -> list[RequestRecord]:
    """The records :func:`write_csv` wrote (its ``latency_ms`` column is derived, and dropped)."""
    records = []
    with open(path, newline="") as f:
        for d in csv.DictReader(f):
            records.append(RequestRecord(
                int(d["index"]), d["slo_class"], float(d["deadline_ms"]), float(d["send_s"]), float(d["answer_s"]),
                d["status"], float(d["level"]), int(d["batch_size"]), _optional(d["correct"], lambda t: t == "True"),
                d["late"] == "True", float(d["exec_ms"]), float(d["predicted_ms"]), float(d["queue_ms"]),
                float(d["server_ms"]), d["detail"], _optional(d["scheduled_s"], float)))
    return records


def format_table(summary: dict) -> str:
    """A human-readable per-class table."""
    head = f"{'class':<12}{'sent':>7}{'in SLO':>9}{'attain':>8}{'acc':>8}{'p50 ms':>9}{'p99 ms':>9}  levels / errors"
    lines = [head, "-" * len(head)]
    for name, s in summary.items():
        acc = f"{s['served_accuracy']:.4f}" if s["served_accuracy"] is not None else "-"
        att = f"{s['attainment'] * 100:.1f}%" if s["attainment"] is not None else "-"
        p50 = s["p50_ms"] if s["p50_ms"] is not None else "-"
        p99 = s["p99_ms"] if s["p99_ms"] is not None else "-"
        extra = " ".join(f"{k}:{v}" for k, v in s["levels"].items())
        if s["errors"]:
            extra += "  " + " ".join(f"{k}:{v}" for k, v in s["errors"].items())
        lines.append(f"{name:<12}{s['sent']:>7}{s['within_deadline']:>9}{att:>8}{acc:>8}{p50:>9}{p99:>9}  {extra}")
    return "\n".join(lines)
