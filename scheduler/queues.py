"""One queue per (model, SLO class), kept in the policy's order (EDF for slonn)."""

from __future__ import annotations

from heapq import heapify, heappop, heappush
from typing import Any, Callable, Iterator

from slonn.policy.planner import Pending


class QueuedRequest:
    """A request waiting for a batch: the planner's view plus what the caller needs back."""

    __slots__ = ("pending", "model", "slo_class", "inputs", "handle", "cancelled", "late", "queued", "attempts")

    def __init__(self, pending: Pending, model: str, slo_class: str, inputs: Any, handle: Any = None) -> None:
        self.pending = pending
        self.model = model
        self.slo_class = slo_class
        self.inputs = inputs
        """The input sample (server: np.ndarray; simulator: None)."""
        self.handle = handle
        """Whatever the caller completes (server: an asyncio.Future)."""
        self.cancelled = False
        self.late = False
        self.queued = False
        """In a queue right now (False once popped into a batch)."""
        self.attempts = 0
        """Batches it was in whose worker died (see Scheduler.retry)."""

    def __repr__(self) -> str:
        p = self.pending
        return f"QueuedRequest(seq={p.seq}, {self.model}/{self.slo_class}, deadline={p.deadline_s:.4f})"


class RequestQueue:
    """A bounded heap of requests ordered by ``key``; cancelled entries are removed lazily."""

    def __init__(self, key: Callable[[Pending], tuple], max_len: int) -> None:
        self._key = key
        self._heap: list[tuple[tuple, QueuedRequest]] = []
        self._live = 0
        self.max_len = max_len

    def __len__(self) -> int:
        """Live (not cancelled) requests."""
        return self._live

    def full(self) -> bool:
        return self._live >= self.max_len

    def push(self, req: QueuedRequest) -> None:
        if req.cancelled:
            return  # its caller left while it was out of the queue
        heappush(self._heap, (self._key(req.pending), req))
        req.queued = True
        self._live += 1

    def cancel(self, req: QueuedRequest) -> None:
        """Mark ``req`` cancelled; if queued it is skipped (and dropped) when it reaches the head."""
        if req.cancelled:
            return
        req.cancelled = True
        if req.queued:
            self._live -= 1

    def _skip_cancelled(self) -> None:
        heap = self._heap
        while heap and heap[0][1].cancelled:
            heappop(heap)

    def peek(self) -> QueuedRequest | None:
        self._skip_cancelled()
        return self._heap[0][1] if self._heap else None

    def peek_key(self) -> tuple | None:
        self._skip_cancelled()
        return self._heap[0][0] if self._heap else None

    def pop(self) -> QueuedRequest:
        self._skip_cancelled()
        _, req = heappop(self._heap)
        req.queued = False
        self._live -= 1
        return req

    def __iter__(self) -> Iterator[QueuedRequest]:
        """Live requests in no particular order."""
        return (r for _, r in self._heap if not r.cancelled)

    def drain(self) -> list[QueuedRequest]:
        """Remove and return every live request."""
        out = [r for _, r in self._heap if not r.cancelled]
        for r in out:
            r.queued = False
        self._heap.clear()
        self._live = 0
        return out


def peek_merged(queues: list[RequestQueue]) -> QueuedRequest | None:
    """The request ``pop_merged`` would pop first (ties between queues go to the earlier queue, as there)."""
    best: QueuedRequest | None = None
    best_key: tuple | None = None
    for q in queues:
        k = q.peek_key()
        if k is not None and (best_key is None or k < best_key):
            best, best_key = q._heap[0][1], k
    return best


def pop_merged(queues: list[RequestQueue], limit: int) -> list[QueuedRequest]:
    """Pop up to ``limit`` requests across ``queues`` in key order (a k-way merge of the heads)."""
    heads = []
    for qi, q in enumerate(queues):
        k = q.peek_key()
        if k is not None:
            heads.append((k, qi))
    heapify(heads)
    out: list[QueuedRequest] = []
    while heads and len(out) < limit:
        _, qi = heappop(heads)
        out.append(queues[qi].pop())
        k = queues[qi].peek_key()
        if k is not None:
            heappush(heads, (k, qi))
    return out
