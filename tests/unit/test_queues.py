"""RequestQueue (EDF heap, lazy cancel, bounded) and pop_merged (k-way merge across queues)."""

from __future__ import annotations

import itertools

import pytest

from slonn.policy.planner import Pending, edf_key
from slonn.scheduler.queues import QueuedRequest, RequestQueue, pop_merged

_seq = itertools.count()


def req(deadline_s: float, priority: int = 1, slo_class: str = "c", arrival_s: float = 0.0) -> QueuedRequest:
    p = Pending(next(_seq), arrival_s, deadline_s, 0.0, priority, "latency", "reject")
    return QueuedRequest(p, "m", slo_class, None)


def test_pops_in_edf_order_with_priority_then_seq_tie_break():
    q = RequestQueue(edf_key, max_len=100)
    a = req(0.30)
    b = req(0.10)
    c = req(0.20, priority=2)
    d = req(0.20, priority=0)
    e = req(0.20, priority=0)  # same deadline and priority as d, admitted later
    for r in (a, b, c, d, e):
        q.push(r)
    assert q.peek() is b
    assert q.peek_key() == edf_key(b.pending)
    assert [q.pop() for _ in range(5)] == [b, d, e, c, a]
    assert len(q) == 0 and q.peek() is None and q.peek_key() is None


def test_len_counts_live_requests_and_full_uses_it():
    q = RequestQueue(edf_key, max_len=2)
    a, b = req(0.1), req(0.2)
    q.push(a)
    assert not q.full()
    q.push(b)
    assert len(q) == 2 and q.full()
    q.cancel(a)
    assert len(q) == 1 and not q.full()


def test_cancel_is_lazy_and_idempotent():
    q = RequestQueue(edf_key, max_len=10)
    a, b, c = req(0.1), req(0.2), req(0.3)
    for r in (a, b, c):
        q.push(r)
    q.cancel(b)
    q.cancel(b)  # twice: counted once
    assert b.cancelled
    assert len(q) == 2
    assert set(q) == {a, c}  # iteration skips cancelled entries
    q.cancel(a)  # the head: skipped by peek/pop
    assert len(q) == 1
    assert q.peek() is c
    assert q.pop() is c
    assert len(q) == 0 and q.peek() is None


def test_drain_returns_live_requests_only():
    q = RequestQueue(edf_key, max_len=10)
    rs = [req(0.1 * i) for i in range(1, 5)]
    for r in rs:
        q.push(r)
    q.cancel(rs[1])
    assert sorted(q.drain(), key=lambda r: r.pending.seq) == [rs[0], rs[2], rs[3]]
    assert len(q) == 0 and q.peek() is None


def test_pop_merged_merges_across_queues_in_key_order():
    q1, q2, q3 = (RequestQueue(edf_key, 100) for _ in range(3))
    deadlines = {q1: [0.1, 0.4, 0.7], q2: [0.2, 0.5], q3: [0.3, 0.6, 0.8, 0.9]}
    for q, ds in deadlines.items():
        for d in ds:
            q.push(req(d))
    out = pop_merged([q1, q2, q3], limit=6)
    assert [r.pending.deadline_s for r in out] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert (len(q1), len(q2), len(q3)) == (1, 0, 2)
    rest = pop_merged([q1, q2, q3], limit=100)
    assert [r.pending.deadline_s for r in rest] == [0.7, 0.8, 0.9]


def test_pop_merged_skips_cancelled_and_empty_queues():
    q1, q2, empty = (RequestQueue(edf_key, 100) for _ in range(3))
    a, b, c = req(0.1), req(0.2), req(0.3)
    q1.push(a)
    q1.push(c)
    q2.push(b)
    q1.cancel(a)
    assert pop_merged([empty, q1, q2], limit=10) == [b, c]
    assert pop_merged([empty, q1, q2], limit=10) == []


def test_pop_merged_priority_breaks_deadline_ties_across_queues():
    low, high = RequestQueue(edf_key, 10), RequestQueue(edf_key, 10)
    x = req(0.5, priority=2)
    y = req(0.5, priority=0)
    low.push(x)
    high.push(y)
    assert pop_merged([low, high], limit=2) == [y, x]


@pytest.mark.parametrize("limit", [0, 1])
def test_pop_merged_respects_limit(limit):
    q = RequestQueue(edf_key, 10)
    for d in (0.1, 0.2):
        q.push(req(d))
    assert len(pop_merged([q], limit)) == limit
    assert len(q) == 2 - limit
