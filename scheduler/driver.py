"""The scheduling loop around the pure ``Scheduler``, written once for the live dispatcher and the simulator.

What turns "a worker is idle" into batches: admission (the in-flight cap, the caller's deadline), the
planning contexts (latency table, contention bucket, the learned overhead allowance), one batch per idle
worker, early answers for requests that can no longer make it and when to look again, feedback after a
batch, and a second run after a worker died. Like vLLM's scheduler it is synchronous and clock-free:
every method takes ``now``; nothing here awaits, reads a clock or does I/O. ``scheduler.dispatcher``
(asyncio, the worker pool, futures, metrics) and ``scheduler.simulator`` (an event heap on a virtual
clock) are two shells around the same :class:`Driver`.
"""

from __future__ import annotations

import bisect
import collections.abc
import math
from dataclasses import replace
from typing import Any, Callable, Mapping

from slonn.policy.names import OnLate
from slonn.policy.planner import PlanContext
from slonn.policy.table import LatencyTable
from slonn.scheduler.core import Batch, Scheduler
from slonn.scheduler.errors import DeadlineUnreachable, QueueFull
from slonn.scheduler.queues import QueuedRequest

OVERHEAD_WINDOW = 256
"""Recent batches whose overhead (done - planned - exec) sets the planner's overhead allowance."""
OVERHEAD_STALE_S = 1.0
"""Without a finished batch for this long, a raised overhead allowance is halved (see _forget_stale_overhead)."""
OVERHEAD_REFIT_EVERY = 16
"""Batches between two estimates of the overhead allowance."""
FRONTEND_BATCH_MS = 0.5
"""Starting per-batch frontend CPU (ms) of the live server until it has measured its own: dispatch, IPC round
trip and fan-out on a 2-vCPU EPYC VM (`python -m bench.profile_frontend`, docs/latency-model.md)."""
FRONTEND_REQUEST_MS = 0.5
"""Starting per-request frontend CPU (ms): the server process spent 0.57 ms per unary call and 0.39 ms per stream
message there, its per-batch share included."""
FRONTEND_INTERVAL_S = 0.05
"""How often the driver reads the frontend's CPU and refreshes its cost estimates and the arrival rate."""
FRONTEND_FORGET = 0.97
"""Weight an interval's observation keeps per later interval (a ~1.7 s window at FRONTEND_INTERVAL_S)."""
FRONTEND_RATE_ALPHA = 0.2
"""Share of the newest interval in the smoothed arrival rate (a ~0.25 s window)."""
FRONTEND_PRIOR_WEIGHT = 1.0
"""Weight of the prior costs, as one interval of one batch and one request: the first busy intervals replace them."""
ANSWER_MARGIN_MS = 5.0
"""The server answers this long before the caller's own deadline; with less left, a request is refused."""


def caller_budget(budget_ms: float, time_left_ms: float | None,
                  margin_ms: float = ANSWER_MARGIN_MS) -> tuple[float, bool]:
    """The latency budget to admit a request with, and whether it is hard (see ``Scheduler.make_request``).

    ``budget_ms``: the request's own budget (0 = the class's). ``time_left_ms``: what the caller's deadline
    (its gRPC deadline) leaves, or None without one. The caller's deadline tightens the class deadline too
    (time spent reaching the server included); with ``margin_ms`` or less left, queueing the request would
    only make work nobody reads (a request already in a batch cannot be taken back): DeadlineUnreachable.
    """
    if time_left_ms is None:
        return budget_ms, False
    if time_left_ms <= margin_ms:
        raise DeadlineUnreachable(f"the call's deadline leaves {time_left_ms:.1f} ms; not admitted")
    left_ms = max(time_left_ms, 0.0)
    hard = budget_ms == 0 or left_ms <= budget_ms
    return (left_ms if hard else budget_ms), hard


class OverheadWindow:
    """The last OVERHEAD_WINDOW batches' overheads (done - planned - exec) and their 95th percentile: the
    driver's overhead allowance, one for the pool and, with per-node planning, one per node."""

    __slots__ = ("values", "ranked", "oldest", "count")

    def __init__(self) -> None:
        self.values: list[float] = []
        """A ring: ``oldest`` is where the next one goes once it is full."""
        self.ranked: list[float] = []
        """The same overheads in ascending order, kept so (a bisect per batch) instead of sorted at each
        estimate: the simulator estimates every OVERHEAD_REFIT_EVERY batches, and sorting was most of it."""
        self.oldest = 0
        self.count = 0
        """Overheads added since the start (not reset by :meth:`clear`)."""

    def add(self, ms: float) -> bool:
        """Add one batch's overhead; True every OVERHEAD_REFIT_EVERY batches (time for a new estimate)."""
        ranked = self.ranked
        values = self.values
        if len(values) < OVERHEAD_WINDOW:
            values.append(ms)
        else:
            del ranked[bisect.bisect_left(ranked, values[self.oldest])]
            values[self.oldest] = ms
            self.oldest = (self.oldest + 1) % OVERHEAD_WINDOW
        bisect.insort(ranked, ms)
        self.count += 1
        return self.count % OVERHEAD_REFIT_EVERY == 0

    def p95(self) -> float:
        return percentile_95(self.ranked)

    def clear(self) -> None:
        self.values.clear()
        self.ranked.clear()
        self.oldest = 0


class NodeState:
    """What the driver keeps per node when it plans per node (:meth:`Driver.set_nodes`)."""

    __slots__ = ("workers", "overhead_ms", "window", "contexts", "contexts_s", "contexts_overhead_ms",
                 "contexts_frontend", "batch_ms")

    def __init__(self, workers: int, overhead_ms: float) -> None:
        self.workers = workers
        """Live workers on the node."""
        self.overhead_ms = overhead_ms
        """The node's overhead allowance: the p95 of its own batches' overheads, at least the floor."""
        self.window = OverheadWindow()
        self.contexts: dict[str, PlanContext] = {}
        """Per model: what a batch on this node is planned with."""
        self.contexts_s = -math.inf
        self.contexts_overhead_ms = overhead_ms
        self.contexts_frontend = -1
        """The driver's frontend-cost version the contexts carry."""
        self.batch_ms = 0.0
        """A full batch of each model's fastest level on this node, summed over the models (safe bound plus
        the node's overhead): how the node's speed is compared with the others'."""


class DispatchOutput:
    """What one :meth:`Driver.next_batches` call decided. Read it; do not modify it (with nothing queued,
    every call returns the same empty one)."""

    __slots__ = ("batches", "expired", "wake_at_s")

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        """One batch per idle worker at most, in the order planned: run each on a worker now."""
        self.expired: list[QueuedRequest] = []
        """Requests that can no longer make their deadline: answer them DEADLINE_EXCEEDED now."""
        self.wake_at_s: float | None = None
        """When to call ``next_batches`` again even if nothing happens (strictly after ``now``), or None."""


class Driver:
    """Admits requests, plans a batch per idle worker, learns the overhead allowance; pure and clock-free.

    ``tables``: each model's latency table, fixed (a mapping), or ``tables(model)``, the latest one (it may
    change between calls). ``contention``: the contention the planner sees, fixed, or ``contention(now)``.

    Workers on several nodes (a Ray cluster): after :meth:`set_nodes`, a batch is planned for the node of
    the idle worker it will run on, with that node's table (``node_tables(model, node)``), contention
    (``node_contention(node, now)``) and overhead allowance (learned from that node's batches); see
    :meth:`next_batches`. Without it (a process pool, the simulator) there is one machine, as before.
    """

    def __init__(self, scheduler: Scheduler, tables: Mapping[str, LatencyTable] | Callable[[str], LatencyTable],
                 accuracy: Mapping[str, tuple[float, ...]], max_batch: int, overhead_ms: float = 1.0,
                 workers: int = 1, max_inflight: int = 8192,
                 contention: float | Callable[[float], float] = 0.0, start_s: float = 0.0,
                 frontend_cpu: Callable[[float], float] | None = None, frontend_batch_ms: float = 0.0,
                 frontend_request_ms: float = 0.0,
                 node_tables: Callable[[str, str], LatencyTable] | None = None,
                 node_contention: Callable[[str, float], float] | None = None) -> None:
        self.scheduler = scheduler
        self.frontend = FrontendCost(frontend_batch_ms, frontend_request_ms)
        """The frontend's learned per-batch and per-request CPU and the arrival rate the planner sees."""
        self._frontend_cpu = frontend_cpu
        """``frontend_cpu(now)``: the frontend's CPU seconds so far (the event-loop thread's; the simulator's
        modelled frontend); None: not measured, the planner sees no frontend cost."""
        self._frontend_s = start_s
        self._frontend_cpu_s = frontend_cpu(start_s) if frontend_cpu is not None else 0.0
        self._arrivals = 0
        """Requests seen by admit (admitted or refused: both cost the frontend) since the last interval."""
        self._dispatched = 0
        """Batches planned since the last interval."""
        self._frontend_version = 0
        self._fixed_tables: dict[str, LatencyTable] = {}
        self._tables: Callable[[str], LatencyTable] | None = None
        if isinstance(tables, collections.abc.Mapping):
            self._fixed_tables.update(tables)
        else:
            self._tables = tables
        self._fixed_contention = 0.0
        self._contention: Callable[[float], float] | None = None
        if isinstance(contention, (int, float)):
            self._fixed_contention = float(contention)
        else:
            self._contention = contention
        self._steady = self._tables is None and self._contention is None
        """Nothing but the overhead allowance changes the contexts (the simulator without a co-runner)."""
        self._accuracy = dict(accuracy)
        self.max_batch = max_batch
        self.workers = workers
        self.max_inflight = max_inflight
        self.inflight = 0
        """Admitted requests not yet answered (see :meth:`release`)."""
        self.stopped = False
        """:meth:`stop` was called: nothing is queued again."""
        self.min_overhead_ms = overhead_ms
        """Floor of the per-batch overhead the planner adds to predicted exec time."""
        self.overhead_ms = overhead_ms
        """Current overhead: the 95th percentile of measured (batch done - planned - exec), at least the floor."""
        self._window = OverheadWindow()
        """Every batch's overhead, whatever its node."""
        self._last_batch_s = start_s
        self._refused_since_batch = False
        """Admission refused a request as out of reach since the last finished batch."""
        self._contexts: dict[str, PlanContext] = {}
        self._contexts_s = -math.inf
        """When ``_contexts`` was last brought up to date, and with which overhead allowance."""
        self._contexts_overhead_ms = overhead_ms
        self._contexts_frontend = 0
        self._node_tables = node_tables
        self._node_contention = node_contention
        self._nodes: dict[str, NodeState] = {}
        """Per-node planning (:meth:`set_nodes`): node -> its state; empty: one machine."""
        self._judged: list[PlanContext] = []
        """The node contexts the last admission contexts were built from (per-node planning)."""

    # -- admission ----------------------------------------------------------

    def admit(self, model: str, slo_class: str, now: float, inputs: Any = None, handle: Any = None,
              budget_ms: float | None = None, hard: bool = False) -> QueuedRequest:
        """Queue a request, or raise the RequestError it is answered with at once (never queued).

        ``budget_ms``/``hard``: see :func:`caller_budget`. The caller answers an admitted request once
        and then calls :meth:`release`.
        """
        self._arrivals += 1
        if self.inflight >= self.max_inflight:
            raise QueueFull(f"server has {self.inflight} requests in flight (max_inflight={self.max_inflight})")
        sched = self.scheduler
        req = sched.make_request(model, slo_class, now, inputs, budget_ms, handle, hard)
        try:
            sched.add_request(req, now, self.contexts(now)[model])
        except DeadlineUnreachable:
            if not self._refused_since_batch:
                self._refused_since_batch = True
                self._last_batch_s = max(self._last_batch_s, now)  # staleness counts from the first refusal
            raise
        self.inflight += 1
        return req

    def release(self, n: int = 1) -> None:
        """``n`` admitted requests were answered, or their callers left."""
        self.inflight -= n

    def cancel(self, req: QueuedRequest) -> None:
        """The caller left: no work for callers who are gone (a no-op once ``req`` is in a batch)."""
        self.scheduler.cancel(req)

    # -- planning -------------------------------------------------------------

    def contexts(self, now: float) -> dict[str, PlanContext]:
        """What the policy plans with at ``now``, per model (the same objects while nothing changed: the
        policy remembers what it derived from the last one). Do not modify the dict.

        Planning per node, these are what admission and expiry judge by: see :meth:`_judging_contexts`."""
        if self._nodes:
            return self._judging_contexts(now)
        current = self._contexts
        if now == self._contexts_s and self.overhead_ms == self._contexts_overhead_ms:
            return current  # asked again at the same instant (admission, then dispatch): nothing moved
        self._forget_stale_overhead(now)
        if self._frontend_cpu is not None and now - self._frontend_s >= FRONTEND_INTERVAL_S:
            self._observe_frontend(now)
        if self._steady and current and self.overhead_ms == self._contexts_overhead_ms \
                and self._frontend_version == self._contexts_frontend:
            return current
        contention = self._fixed_contention if self._contention is None else self._contention(now)
        overhead = self._contexts_overhead_ms = self.overhead_ms
        self._contexts_frontend = self._frontend_version
        fe = self._frontend_terms()
        self._contexts_s = now
        fresh: dict[str, PlanContext] | None = None
        for model, acc in self._accuracy.items():
            table = self._fixed_tables[model] if self._tables is None else self._tables(model)
            ctx = current.get(model)
            new = context_for(ctx, table, table.bucket(contention), acc, self.max_batch, overhead, self.workers, fe)
            if new is not ctx:
                if fresh is None:
                    fresh = dict(current)
                fresh[model] = new
        if fresh is not None:
            self._contexts = fresh
            return fresh
        return current

    def _frontend_terms(self) -> tuple[float, float, float]:
        """(per-batch ms, per-request ms, arrivals/s) of the frontend for the planner; zeros while unmeasured."""
        if self._frontend_cpu is None:
            return 0.0, 0.0, 0.0
        fe = self.frontend
        return fe.batch_ms, fe.request_ms, fe.arrival_per_s

    def next_batches(self, idle: int, now: float, nodes: list[str] | None = None) -> DispatchOutput:
        """Plan a batch per idle worker (``idle`` of them), answer early whoever can no longer make it, and
        say when to look again. Call it after every event: an arrival, a finished batch, a wake-up.

        ``nodes`` (per-node planning, after :meth:`set_nodes`): the node of each idle worker, one entry per
        worker (``idle`` is then ignored). Batches are planned for the fastest of them first (the most
        urgent requests get the fastest worker), each with its node's contexts, and say so in
        ``Batch.node``: run each on an idle worker of that node.

        With no idle worker it still expires: a request must not wait for a worker only to learn it is
        late. A call that raises loses nobody: what it had taken out of the queues goes back.
        """
        sched = self.scheduler
        if not sched.pending():
            return _NOTHING  # after most finished batches at low load: no allocation
        out = DispatchOutput()
        try:
            contexts = self.contexts(now)  # the same for every decision of this call: nothing else moves
            order = _NO_NODES
            per_node = nodes is not None and bool(self._nodes)
            if per_node and nodes is not None:
                order = self._fastest_first(nodes, now)
                idle = len(order)
            node = ""
            while True:
                if idle <= 0:
                    out.expired.extend(sched.expire(now, contexts))
                    out.wake_at_s = sched.next_expiry_s(contexts)
                    break
                if per_node:
                    # Planned with the node's table, contention and overhead; judged hopeless only by the
                    # contexts admission uses (the fastest node's), not because this worker is slow.
                    node = order[len(out.batches)]
                    step = sched.schedule(now, self.node_contexts(node, now), contexts)
                else:
                    step = sched.schedule(now, contexts)
                if step.expired:
                    out.expired.extend(step.expired)
                batch = step.batch
                if batch is None:
                    wake = step.wake_at_s
                    if wake is not None:  # a wait: a head that turns hopeless before it ends wakes the loop then
                        expiry = sched.next_expiry_s(contexts)
                        if expiry is not None and expiry < wake:
                            wake = expiry
                    out.wake_at_s = wake
                    break
                batch.node = node
                out.batches.append(batch)
                self._dispatched += 1
                idle -= 1
                if not sched.pending():
                    break
        except BaseException:
            for batch in out.batches:
                sched.requeue(batch.requests)
            sched.requeue(out.expired)
            raise
        wake = out.wake_at_s
        if wake is not None and wake <= now:
            # Look again just after now, not at now: a head turns hopeless only once now is past its time.
            out.wake_at_s = math.nextafter(now, math.inf)
        return out

    # -- per-node planning ---------------------------------------------------------

    def set_nodes(self, workers: Mapping[str, int]) -> None:
        """Plan per node from now on: ``workers`` maps each node to its live workers (call it again whenever
        that changes). A node keeps its overhead allowance while it stays; a new one starts from the pool's.
        Empty: back to one machine (the pool's table, contention and allowance)."""
        nodes: dict[str, NodeState] = {}
        for name, n in workers.items():
            if n <= 0:
                continue
            state = self._nodes.get(name)
            if state is None:
                state = NodeState(n, self.overhead_ms)
            state.workers = n
            nodes[name] = state
        self._nodes = nodes
        self._judged = []
        # Rebuilt from scratch: with the nodes gone, the judging contexts (the fastest node's table and bucket,
        # the nodes' capacity as workers) must not pass for one machine's when its table is the same object.
        self._contexts = {}
        self._contexts_s = -math.inf

    def node_overhead_ms(self) -> dict[str, float]:
        """Per node: its overhead allowance (empty without per-node planning)."""
        return {name: state.overhead_ms for name, state in self._nodes.items()}

    def node_contexts(self, node: str, now: float) -> dict[str, PlanContext]:
        """What a batch on a worker of ``node`` is planned with at ``now``, per model: the node's table,
        contention bucket and overhead allowance (the same objects while nothing changed)."""
        state = self._nodes.get(node)
        if state is None:  # an idle worker on a node set_nodes has not named yet: one worker, for now
            state = self._nodes[node] = NodeState(1, self.overhead_ms)
            self._judged = []
        if now == state.contexts_s and state.overhead_ms == state.contexts_overhead_ms \
                and state.contexts_frontend == self._frontend_version:
            return state.contexts
        if self._node_contention is not None:
            contention = self._node_contention(node, now)
        else:
            contention = self._fixed_contention if self._contention is None else self._contention(now)
        overhead = state.contexts_overhead_ms = state.overhead_ms
        state.contexts_s = now
        state.contexts_frontend = self._frontend_version
        fe = self._frontend_terms()  # one frontend, whichever node runs the batch
        current = state.contexts
        fresh: dict[str, PlanContext] | None = None
        total_ms = 0.0
        for model, acc in self._accuracy.items():
            if self._node_tables is not None:
                table = self._node_tables(model, node)
            else:
                table = self._fixed_tables[model] if self._tables is None else self._tables(model)
            ctx = current.get(model)
            new = context_for(ctx, table, table.bucket(contention), acc, self.max_batch, overhead, 1.0, fe)
            if new is not ctx:
                if fresh is None:
                    fresh = dict(current)
                fresh[model] = new
            total_ms += full_batch_ms(new)
        state.batch_ms = total_ms
        if fresh is not None:
            state.contexts = fresh
            return fresh
        return current

    def _judging_contexts(self, now: float) -> dict[str, PlanContext]:
        """Per-node planning: what admission and expiry judge by, per model. A request is hopeless only if it
        is on the fastest node, so these are that node's contexts; the backlog ahead of a request is shared
        by every live worker at its node's speed, so ``workers`` is their capacity in workers of the fastest
        node: the sum over nodes of workers x (the fastest node's full-batch time / this node's)."""
        self._forget_stale_overhead(now)
        if self._frontend_cpu is not None and now - self._frontend_s >= FRONTEND_INTERVAL_S:
            self._observe_frontend(now)
        per_node = [self.node_contexts(name, now) for name in list(self._nodes)]
        judged = [ctx for contexts in per_node for ctx in contexts.values()]
        if len(judged) == len(self._judged) and all(a is b for a, b in zip(judged, self._judged)):
            return self._contexts
        states = list(self._nodes.values())
        fresh: dict[str, PlanContext] = {}
        for model in self._accuracy:
            best = per_node[0][model]
            best_ms = full_batch_ms(best)
            for contexts in per_node:
                ms = full_batch_ms(contexts[model])
                if ms < best_ms:
                    best, best_ms = contexts[model], ms
            capacity = 0.0
            for state, contexts in zip(states, per_node):
                capacity += state.workers * best_ms / full_batch_ms(contexts[model])
            fresh[model] = replace(best, workers=capacity)
        self._contexts, self._judged = fresh, judged
        return fresh

    def _fastest_first(self, nodes: list[str], now: float) -> list[str]:
        """``nodes`` ordered by their full-batch time (ties: as given)."""
        for name in nodes:
            self.node_contexts(name, now)  # brings each node's batch_ms up to date
        states = self._nodes
        return sorted(nodes, key=lambda name: states[name].batch_ms)

    # -- feedback ---------------------------------------------------------------

    def on_batch_done(self, batch: Batch, exec_ms: float, now: float) -> None:
        """``batch`` ran in ``exec_ms`` and its answers are back at ``now``: learn from it."""
        ms = (now - batch.planned_at_s) * 1e3 - exec_ms
        self._observe_overhead(ms, now)
        if self._nodes:
            node = self._nodes.get(batch.node)
            if node is not None and node.window.add(ms):
                node.overhead_ms = max(self.min_overhead_ms, node.window.p95())
        self.scheduler.update_from_output(batch, exec_ms, now)

    def missed(self, req: QueuedRequest, now: float) -> DeadlineUnreachable | None:
        """The answer for ``req``, whose batch finished at ``now``, if its result may not be served: a
        request that must not be answered late (class ``on_late = "reject"``, or a caller's deadline that
        binds) whose batch finished after its deadline gets DEADLINE_EXCEEDED, not a result flagged late.
        None: serve the result (in time, or late in a class that serves late answers, flagged ``late``)."""
        p = req.pending
        if now <= p.deadline_s or p.on_late != OnLate.REJECT:
            return None
        return DeadlineUnreachable(
            f"deadline missed by {(now - p.deadline_s) * 1e3:.1f} ms: the {(p.deadline_s - p.arrival_s) * 1e3:.1f} ms "
            f"deadline passed before the batch finished; late results are served only in on_late = \"serve\" "
            f"classes (slo_class {req.slo_class!r})")

    def on_worker_died(self, requests: list[QueuedRequest]) -> tuple[list[QueuedRequest], list[QueuedRequest]]:
        """The worker running a batch died; ``requests``: its requests whose callers still wait.

        Returns (queued again, to answer UNAVAILABLE). Not retried blindly as a batch: by the time a worker
        is free the deadlines have moved, and the scheduler decides again (a request that can no longer
        make it is expired instead of waiting for a replacement worker). A second death fails the request,
        and so does any death after :meth:`stop`.
        """
        if self.stopped:
            return [], list(requests)
        spent = self.scheduler.retry(requests)
        return [r for r in requests if r.queued], spent  # retry() does not queue a caller who left

    def drain(self) -> list[QueuedRequest]:
        """Remove and return every queued request (the caller answers them)."""
        return self.scheduler.drain()

    def stop(self) -> list[QueuedRequest]:
        """Shutting down: :meth:`drain`, and from now on a worker death queues nothing again."""
        self.stopped = True
        return self.drain()

    # -- the frontend's cost ------------------------------------------------------

    def _observe_frontend(self, now: float) -> None:
        """Close a measuring interval: its frontend CPU against the requests and batches it handled."""
        assert self._frontend_cpu is not None
        cpu_s = self._frontend_cpu(now)
        self.frontend.observe((cpu_s - self._frontend_cpu_s) * 1e3, self._dispatched, self._arrivals,
                              now - self._frontend_s)
        self._frontend_cpu_s = cpu_s
        self._frontend_s = now
        self._arrivals = self._dispatched = 0
        self._frontend_version += 1

    # -- the overhead allowance ---------------------------------------------------

    def _forget_stale_overhead(self, now: float) -> None:
        """Halve a raised overhead allowance for every OVERHEAD_STALE_S without a finished batch while
        admission is refusing requests as out of reach.

        The allowance is learned only from batches that ran. If a burst of contention raises it far
        enough, admission turns every request away, no batch runs, and it would never come down again:
        the server would refuse everything after the contention is gone, or serve nothing for a whole
        co-runner window (`python -m bench.adapt`). Without evidence it decays, so a
        few requests get through and measure the machine again.
        """
        if (self.overhead_ms <= self.min_overhead_ms and not self._nodes) or not self._refused_since_batch:
            return  # an idle server keeps what it learned: the next burst meets the same machine
        if now - self._last_batch_s > OVERHEAD_STALE_S:
            self.overhead_ms = max(self.min_overhead_ms, self.overhead_ms / 2)
            self._window.clear()  # the next estimate comes from batches run from here on
            for node in self._nodes.values():
                node.overhead_ms = max(self.min_overhead_ms, node.overhead_ms / 2)
                node.window.clear()
            self._last_batch_s = now

    def _observe_overhead(self, ms: float, now: float) -> None:
        """Learn what a batch costs beyond exec (IPC, event-loop delay): the planner must budget for it."""
        self._last_batch_s = now
        self._refused_since_batch = False
        if self._window.add(ms):
            self.overhead_ms = max(self.min_overhead_ms, self._window.p95())


_NOTHING = DispatchOutput()
_NO_NODES: list[str] = []


class FrontendCost:
    """What the frontend (one event-loop thread) spends per batch and per request, and the arrival rate.

    Fit on intervals of ``cpu_ms = batch_ms x batches + request_ms x requests``: least squares over every
    interval so far, each weighted down by FRONTEND_FORGET per later interval, plus a ridge prior toward the
    starting costs (weight FRONTEND_PRIOR_WEIGHT), costs kept >= 0. O(1) per interval: five running sums and
    a 2x2 solve. Under Poisson load the batch size varies, which separates the two costs; with it constant
    the prior picks among the splits that fit (they predict the same load at that size)."""

    __slots__ = ("batch_ms", "request_ms", "arrival_per_s", "prior_batch_ms", "prior_request_ms", "_bb", "_br",
                 "_rr", "_by", "_ry", "intervals")

    def __init__(self, batch_ms: float = 0.0, request_ms: float = 0.0) -> None:
        self.batch_ms = batch_ms
        """Frontend CPU ms per batch (dispatch, IPC round trip, result fan-out)."""
        self.request_ms = request_ms
        """Frontend CPU ms per request (receive, admit, answer)."""
        self.arrival_per_s = 0.0
        """Requests per second reaching admission, smoothed over the last few intervals."""
        self.prior_batch_ms = batch_ms
        self.prior_request_ms = request_ms
        self._bb = self._br = self._rr = self._by = self._ry = 0.0
        self.intervals = 0

    def observe(self, cpu_ms: float, batches: int, requests: int, interval_s: float) -> None:
        """An interval of ``interval_s`` in which the frontend spent ``cpu_ms`` on ``batches`` batches and
        ``requests`` requests."""
        if interval_s > 0.0:  # a long interval (nothing happened) weighs as the intervals it spans
            keep = (1.0 - FRONTEND_RATE_ALPHA) ** (interval_s / FRONTEND_INTERVAL_S)
            self.arrival_per_s = keep * self.arrival_per_s + (1.0 - keep) * requests / interval_s
        f = FRONTEND_FORGET
        self._bb *= f
        self._br *= f
        self._rr *= f
        self._by *= f
        self._ry *= f
        if batches <= 0 and requests <= 0:
            return  # an idle interval says nothing about either cost (its CPU is the loop's own upkeep)
        b, r = float(batches), float(requests)
        self._bb += b * b
        self._br += b * r
        self._rr += r * r
        self._by += b * cpu_ms
        self._ry += r * cpu_ms
        self.intervals += 1
        self._solve()

    def _solve(self) -> None:
        w = FRONTEND_PRIOR_WEIGHT
        a11, a12, a22 = self._bb + w, self._br, self._rr + w
        y1, y2 = self._by + w * self.prior_batch_ms, self._ry + w * self.prior_request_ms
        det = a11 * a22 - a12 * a12
        per_batch = (y1 * a22 - a12 * y2) / det
        per_request = (a11 * y2 - a12 * y1) / det
        if per_batch < 0.0:  # the best fit with the per-batch cost held at 0
            per_batch, per_request = 0.0, max(0.0, y2 / a22)
        elif per_request < 0.0:
            per_batch, per_request = max(0.0, y1 / a11), 0.0
        self.batch_ms, self.request_ms = per_batch, per_request

    def load(self, batches_per_s: float) -> float:
        """Predicted share of one core the frontend spends at the arrival rate and ``batches_per_s``."""
        return (self.arrival_per_s * self.request_ms + batches_per_s * self.batch_ms) * 1e-3


def full_batch_ms(ctx: PlanContext) -> float:
    """A full batch of the fastest level on ``ctx``'s table (safe bound) plus its overhead allowance."""
    table = ctx.table
    return table.safe(ctx.bucket, table.fastest_index(ctx.bucket, ctx.accuracy, 0.0), ctx.max_batch) + ctx.overhead_ms


def context_for(ctx: PlanContext | None, table: LatencyTable, bucket: int, accuracy: tuple[float, ...],
                max_batch: int, overhead_ms: float, workers: float, fe: tuple[float, float, float]) -> PlanContext:
    """``ctx`` itself while none of what it holds moved (the policy remembers what it derived from it), else
    a new context with these values; ``fe``: (per-batch ms, per-request ms, arrivals/s) of the frontend."""
    fe_batch, fe_request, rate = fe
    if ctx is not None and ctx.table is table and ctx.bucket == bucket and ctx.overhead_ms == overhead_ms \
            and ctx.arrival_per_s == rate and ctx.frontend_batch_ms == fe_batch \
            and ctx.frontend_request_ms == fe_request:
        return ctx
    return PlanContext(table, bucket, accuracy, max_batch, overhead_ms, workers=workers, frontend_batch_ms=fe_batch,
                       frontend_request_ms=fe_request, arrival_per_s=rate)


def percentile_95(ranked: list[float]) -> float:
    """The 95th percentile of ``ranked`` (ascending, not empty) with linear interpolation, as
    ``numpy.percentile(ranked, 95)`` computes it (not a numpy call: this runs every few batches on the
    simulator's hot path, where numpy's call overhead dominated)."""
    pos = (len(ranked) - 1) * 0.95
    lo = int(pos)
    hi = min(lo + 1, len(ranked) - 1)
    t = pos - lo
    a, b = ranked[lo], ranked[hi]
    d = b - a
    return b - d * (1 - t) if t >= 0.5 else a + d * t
