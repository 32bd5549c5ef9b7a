"""`slonn reliability`'s bookkeeping: who ended each call, and whether the sender kept its schedule."""

from __future__ import annotations

from slonn.scheduler.report import RequestRecord
from slonn.scripts.reliability import outcome, reject_reason, tally


def rec(status: str, detail: str = "", latency_ms: float = 1.0, lag_ms: float = 0.0) -> RequestRecord:
    r = RequestRecord(0, "interactive", 25.0, send_s=1.0 + lag_ms * 1e-3, scheduled_s=1.0)
    r.status, r.detail, r.answer_s = status, detail, r.send_s + latency_ms * 1e-3
    return r


def test_outcome_tells_who_ended_the_call():
    assert outcome(rec("OK")) == "ok"
    assert outcome(rec("RESOURCE_EXHAUSTED", "Concurrent RPC limit exceeded!")) == "rejected"
    assert outcome(rec("DEADLINE_EXCEEDED", "latency budget 3.00 ms cannot be met for slo_class")) == "rejected"
    assert outcome(rec("DEADLINE_EXCEEDED", "the call's gRPC deadline leaves 2.0 ms; not admitted")) == "rejected"
    assert outcome(rec("DEADLINE_EXCEEDED", "deadline cannot be met: 20.0 ms queued")) == "expired"
    assert outcome(rec("DEADLINE_EXCEEDED", "Deadline Exceeded")) == "grpc_deadline"
    assert outcome(rec("CLIENT_TIMEOUT")) == "unanswered"
    assert outcome(rec("UNANSWERED")) == "unanswered"
    assert outcome(rec("UNAVAILABLE", "worker failed twice")) == "UNAVAILABLE"
    assert outcome(rec("CANCELLED", "CANCELLED")) == "rejected"  # gRPC core's pending-request shedding


def test_tally_counts_every_record_once_and_reports_reject_latency_and_sender_lag():
    records = ([rec("OK", latency_ms=5.0, lag_ms=1.0) for _ in range(6)]
               + [rec("RESOURCE_EXHAUSTED", latency_ms=float(i), lag_ms=50.0) for i in range(1, 4)]
               + [rec("CLIENT_TIMEOUT")])
    out = tally(records, duration_s=2.0)
    assert out["sent"] == 10 and out["offered_per_s"] == 5.0
    assert out["answered_ok"] == 6 and out["ok_on_time"] == 6 and out["unanswered"] == 1
    assert out["outcomes"] == {"ok": 6, "rejected": 3}
    assert out["errors"] == {"RESOURCE_EXHAUSTED": 3}
    assert out["reject_latency"]["p50_ms"] == 2.0
    assert out["reject_latency_by_reason"] == {"inflight_cap": {"count": 3, "p50_ms": 2.0, "p99_ms": 2.98}}
    assert 1.0 < out["send_lag_p99_ms"] <= 50.0


def test_reject_reasons_separate_the_servers_decisions_from_time_lost_before_it():
    assert reject_reason(rec("RESOURCE_EXHAUSTED", "Concurrent RPC limit exceeded!")) == "inflight_cap"
    assert reject_reason(rec("RESOURCE_EXHAUSTED", "slo_class 'x' queue for model 'm' is full")) == "queue_full"
    assert reject_reason(rec("DEADLINE_EXCEEDED", "the call's gRPC deadline leaves 2.0 ms; not admitted")) \
        == "arrived_too_late"
    assert reject_reason(rec("DEADLINE_EXCEEDED", "latency budget 3.00 ms cannot be met")) == "deadline_unreachable"
    assert reject_reason(rec("CANCELLED", "CANCELLED")) == "pending_shed"
