"""Pure batch and level choice: (candidates, now, latency table, accuracy) -> Plan | Wait.

Nothing here reads a clock, awaits, or calls scikit-learn: ``now_s`` is an
argument and latency comes from an immutable :class:`LatencyTable`. The live
server and the simulator call exactly this code.

Policies:
- ``SLOAwarePolicy`` (slonn): earliest deadline first; the largest batch and,
  for it, the most accurate level (latency mode) or the fastest level that
  meets the floor (accuracy mode) whose safe predicted completion is within
  the earliest deadline of the batch.
- baselines (``policy/baselines.py``): dense dynamic batching as Triton does
  it, one fixed level, Clipper-style AIMD.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Sequence

from mypy_extensions import mypyc_attr

from slonn.policy.names import Mode
from slonn.policy.table import LatencyTable


class Pending:
    """What the planner sees of one queued request; treated as immutable.

    A plain class with slots, built once per request: under mypyc it is a native class whose fields
    compiled code reads directly (a NamedTuple's fields go through generic attribute lookup there),
    and interpreted it costs about what a NamedTuple does."""

    __slots__ = ("seq", "arrival_s", "deadline_s", "min_accuracy", "priority", "mode", "on_late")

    def __init__(self, seq: int, arrival_s: float, deadline_s: float, min_accuracy: float, priority: int,
                 mode: str, on_late: str) -> None:
        self.seq = seq
        """Admission order, unique."""
        self.arrival_s = arrival_s
        self.deadline_s = deadline_s
        self.min_accuracy = min_accuracy
        self.priority = priority
        self.mode = mode
        """A :class:`~slonn.policy.names.Mode` ("latency" or "accuracy")."""
        self.on_late = on_late
        """A :class:`~slonn.policy.names.OnLate` ("reject" or "serve")."""

    def __repr__(self) -> str:
        return (f"Pending(seq={self.seq}, arrival_s={self.arrival_s}, deadline_s={self.deadline_s}, "
                f"min_accuracy={self.min_accuracy}, priority={self.priority}, mode={self.mode!r}, "
                f"on_late={self.on_late!r})")


@dataclass(frozen=True, slots=True)
class PlanContext:
    """Everything about the model and the machine a policy needs, fixed for one decision."""

    table: LatencyTable
    bucket: int
    """Contention bucket of the table to read."""
    accuracy: tuple[float, ...]
    """Held-out accuracy of each of table.levels (same order)."""
    max_batch: int
    overhead_ms: float = 0.0
    """Added to every predicted exec time (dispatch, IPC, reply)."""
    backlog_ms: float = 0.0
    """At admission: predicted time to serve the requests queued ahead (0 when planning a head)."""
    workers: float = 1
    """Workers that share the backlog, in workers of this table's speed (with workers on nodes of different
    speeds, fewer than there are: see ``Driver.set_nodes``)."""
    frontend_batch_ms: float = 0.0
    """The frontend's (event-loop) CPU per batch: dispatch, IPC round trip, result fan-out (learned live;
    0: unknown, the planner ignores the frontend)."""
    frontend_request_ms: float = 0.0
    """The frontend's CPU per request admitted and answered (learned live)."""
    arrival_per_s: float = 0.0
    """Requests reaching the frontend per second, recently (0: not measured)."""


class Plan:
    """Run the first ``count`` candidates as one batch at ``level``; treated as immutable.

    A plain class with slots like Pending: one is built per batch on the hot path of both the server and
    the simulator."""

    __slots__ = ("count", "level", "predicted_ms", "late", "reason", "slack_ms", "candidates", "table_mean_ms",
                 "speed")

    def __init__(self, count: int, level: float, predicted_ms: float, late: bool = False, reason: str = "",
                 slack_ms: float = float("nan"), candidates: int = 0, table_mean_ms: float = float("nan"),
                 speed: float = 1.0) -> None:
        self.count = count
        self.level = level
        self.predicted_ms = predicted_ms
        """The upper bound on exec ms (without overhead) the batch was planned with: the table's safe
        prediction, or with the recent slowdown on and its margin known, the table's mean x ``speed`` x the
        margin."""
        self.late = late
        """The batch cannot make its earliest deadline (served late on purpose)."""
        self.reason = reason
        """Why, in words (constant strings: this is on the hot path; numbers go in the fields below)."""
        self.slack_ms = slack_ms
        """Time left to the batch's earliest deadline when it was planned."""
        self.candidates = candidates
        """Requests the policy considered."""
        self.table_mean_ms = table_mean_ms
        """The table's mean exec ms for this batch, before ``speed`` (NaN: the policy did not say): what
        :class:`RecentSlowdown` compares the measured exec ms with."""
        self.speed = speed
        """The recent-slowdown factor when the batch was planned (1: off), which ``predicted_ms`` includes
        once its margin is known."""

    def __eq__(self, other: object) -> bool:
        """Field by field; an unset ``slack_ms`` (NaN) equals another unset one."""
        if not isinstance(other, Plan):
            return NotImplemented
        a, b = self.slack_ms, other.slack_ms
        c, d = self.table_mean_ms, other.table_mean_ms
        return (self.count == other.count and self.level == other.level and self.predicted_ms == other.predicted_ms
                and self.late == other.late and self.reason == other.reason and self.candidates == other.candidates
                and (a == b or (a != a and b != b)) and (c == d or (c != c and d != d)) and self.speed == other.speed)

    def __repr__(self) -> str:
        return (f"Plan(count={self.count}, level={self.level}, predicted_ms={self.predicted_ms}, late={self.late}, "
                f"reason={self.reason!r}, slack_ms={self.slack_ms}, candidates={self.candidates}, "
                f"table_mean_ms={self.table_mean_ms}, speed={self.speed})")


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to run yet; decide again at ``until_s`` (or on the next arrival)."""

    until_s: float


def edf_key(p: Pending) -> tuple:
    """Earliest deadline first; priority, then admission order, break ties."""
    return (p.deadline_s, p.priority, p.seq)


def fifo_key(p: Pending) -> tuple:
    return (p.arrival_s, p.seq)


RECENT_TAU_S = 0.06
"""Time constant of :class:`RecentSlowdown` (seconds). A profile row's ratio to its cell's median has a lag-1
autocorrelation of 0.3-0.65 at ~8 ms between calls; time constants of 30-100 ms did best on the four profiles
it was chosen on, and 60 ms took the held-out MAPE of thirteen profiles down by 0.7-4.3 points, also on the
eight not used to choose it (docs/latency-model.md, "Recent slowdown"). The planner does not use it by
default (see SLOAwarePolicy)."""
RECENT_PRIOR = 1.0
"""Weight (in batches) of the prior "no slowdown" in :class:`RecentSlowdown`: one recent batch moves the
factor half way to its ratio."""
RECENT_MAX_FACTOR = 2.0
""":class:`RecentSlowdown` never scales predictions by more than this, or less than its inverse."""
RECENT_QUANTILE = 0.99
"""The quantile of the factor's own errors that bounds a batch (:meth:`RecentSlowdown.margin`), as the table's safe
prediction is the 99th percentile of the model's out-of-fold residuals."""
RECENT_WINDOW = 256
""":meth:`RecentSlowdown.margin` is taken over the last this many batches: a few seconds under load."""
RECENT_MAX_ERROR = 50.0
"""A factor's log error is capped here (a ratio of e^50): ``exp`` of a degenerate one would overflow."""
RECENT_REFRESH = 8
""":meth:`RecentSlowdown.margin` is recomputed (a sort of the window) every this many batches."""


class RecentSlowdown:
    """How much slower than the latency table the last batches ran: the factor to scale its predictions by.

    The machine's speed drifts faster than any refit: on a shared 2-vCPU VM a batch that ran 20% slow is
    followed by another that does more often than not, tens of milliseconds later. This keeps a
    time-decayed mean of ``log(measured / table mean)`` (time constant ``tau_s``), shrunk toward 0 by a prior
    of ``prior`` batches, and answers ``exp`` of it, clamped to ``[1/max_factor, max_factor]``. O(1) per
    batch and per decision: two ``exp``. ``tau_s`` = 0 turns it off (the factor stays 1).

    It also bounds its own errors (:meth:`margin`): the ``quantile`` of ``log(measured / (table mean x the
    factor when the batch was planned))`` over the last ``window`` batches. The table's safe prediction cannot
    serve for that: its margin covers the very slowdowns the factor already scales by, and multiplying the two
    counts them twice (planning with safe x factor missed more deadlines live than planning without it).

    The same class serves the planner (:class:`SLOAwarePolicy`, when asked) and ``bench.eval_latency``'s
    ``recent_slowdown`` score. One instance per policy: with several models served, every model's batches
    feed the same factor (it measures the machine, and assumes each model's table is about as right)."""

    __slots__ = ("tau_s", "prior", "max_factor", "quantile", "window", "_sum", "_weight", "_t_s", "_errors",
                 "_next", "_count", "_margin")

    def __init__(self, tau_s: float = RECENT_TAU_S, prior: float = RECENT_PRIOR,
                 max_factor: float = RECENT_MAX_FACTOR, quantile: float = RECENT_QUANTILE,
                 window: int = RECENT_WINDOW) -> None:
        if not (0.0 <= tau_s < math.inf and 0.0 < prior < math.inf and 1.0 <= max_factor < math.inf
                and 0.0 < quantile < 1.0 and window >= 1 and math.ceil((window + 1) * quantile) <= window):
            raise ValueError(f"RecentSlowdown: tau_s={tau_s} must be finite and >= 0, prior={prior} finite "
                             f"and > 0, max_factor={max_factor} finite and >= 1, quantile={quantile} in (0, 1), "
                             f"window={window} >= 1 and large enough for that quantile "
                             f"(ceil((window + 1) quantile) <= window, or the margin is never known)")
        self.tau_s = tau_s
        self.prior = prior
        self.max_factor = max_factor
        self.quantile = quantile
        self.window = window
        self._sum = 0.0
        self._weight = 0.0
        self._t_s = -math.inf
        self._errors: list[float] = []
        """Ring buffer of the last ``window`` corrected log errors."""
        self._next = 0
        self._count = 0
        self._margin = 0.0

    def _decay(self, now_s: float) -> float:
        dt = now_s - self._t_s
        return math.exp(-dt / self.tau_s) if dt > 0.0 else 1.0

    def observe(self, now_s: float, measured_ms: float, table_mean_ms: float, factor: float = 1.0) -> None:
        """A batch that the table put at ``table_mean_ms`` ran in ``measured_ms``, finishing at ``now_s``;
        ``factor`` is what :meth:`factor` answered when it was planned (whether or not the plan used it). A
        ratio that is not a finite positive number (a NaN mean from a policy that did not say, an infinite
        time) is ignored: one would stick in the sum for good."""
        if self.tau_s == 0.0 or not (measured_ms > 0.0 and table_mean_ms > 0.0 and 0.0 < factor < math.inf):
            return
        r = math.log(measured_ms / table_mean_ms)
        if not -math.inf < r < math.inf:
            return
        self._add_error(min(RECENT_MAX_ERROR, r - math.log(factor)))
        if now_s > self._t_s:
            d = self._decay(now_s)
            self._sum *= d
            self._weight *= d
            self._t_s = now_s
        self._sum += r
        self._weight += 1.0

    def _add_error(self, e: float) -> None:
        if len(self._errors) < self.window:
            self._errors.append(e)
        else:
            self._errors[self._next] = e
            self._next = (self._next + 1) % self.window
        self._count += 1
        if self._count % RECENT_REFRESH == 0:
            ranked = sorted(self._errors)
            k = math.ceil((len(ranked) + 1) * self.quantile)  # split-conformal rank, as the table's safe bound
            self._margin = math.exp(max(ranked[k - 1], 0.0)) if k <= len(ranked) else 0.0

    def margin(self) -> float:
        """What the factor-scaled table mean is multiplied by to bound a batch: ``exp`` of the ``quantile`` of
        the factor's recent errors (at least 1). 0 while too few batches ran to know it (the finite-sample rank
        ``ceil((n + 1) q)`` exceeds ``n``: fewer than 99 at ``q`` = 0.99, and it is recomputed every
        ``RECENT_REFRESH`` batches, so first known after 104) and when off. Not capped: two host stalls among
        the last ``window`` batches set it until they leave the window, as they widen the table's safe bound."""
        return self._margin

    def factor(self, now_s: float) -> float:
        """What to multiply the table's predictions by at ``now_s``: 1 with no batch in the last few ``tau_s``."""
        if self._weight == 0.0:
            return 1.0
        d = self._decay(now_s)
        z = self._sum * d / (self._weight * d + self.prior)
        bound = math.log(self.max_factor)
        return math.exp(min(bound, max(-bound, z)))


@mypyc_attr(allow_interpreted_subclasses=True)
class Policy:
    """What the scheduler asks of a scheduling policy. A base class rather than a Protocol: compiled
    (mypyc), the scheduler's calls into the built-in policies go through a vtable instead of a generic
    attribute lookup; other policies (tests' wrappers) subclass it from Python."""

    def __init__(self, name: str, may_wait: bool = False) -> None:
        self.name = name
        self.may_wait = may_wait
        """Whether the scheduler asks ``wait_until`` before it takes the candidates out of their queues. A
        policy whose ``plan`` can answer ``Wait`` may say so and implement ``wait_until``; one that does not
        still works (its waits pop and requeue the candidates)."""

    def order_key(self, p: Pending) -> tuple:
        """Queue order (the scheduler keeps each queue sorted by this)."""
        raise NotImplementedError

    def is_hopeless(self, p: Pending, now_s: float, ctx: PlanContext) -> bool:
        """True when ``p`` cannot make its deadline even alone at the fastest level it may use."""
        raise NotImplementedError

    def hopeless_at(self, p: Pending, ctx: PlanContext) -> float | None:
        """When ``p`` becomes hopeless if it is still queued (None: never, e.g. a policy without early drop)."""
        raise NotImplementedError

    def plan(self, candidates: Sequence[Pending], now_s: float, ctx: PlanContext) -> Plan | Wait:
        """Choose a batch (a prefix of ``candidates``, which are in order_key order) and its level."""
        raise NotImplementedError

    def wait_until(self, head: Pending, count: int, now_s: float, ctx: PlanContext) -> float | None:
        """What ``plan`` would answer for ``count`` candidates whose first is ``head``: the ``Wait``'s time, or
        None if it would plan a batch. It must agree with ``plan`` exactly; it only saves popping and
        requeueing the candidates of a decision that is a wait (tests/unit/test_core.py checks both paths)."""
        return None

    def observe(self, plan: Plan, exec_ms: float, deadline_met: bool, finished_s: float) -> None:
        """Feedback after a batch ran, finishing at ``finished_s`` (stateful policies such as AIMD adapt here)."""


def backlog_ms(ahead: int, min_accuracy: float, ctx: PlanContext) -> float:
    """Predicted time for ``ctx.workers`` workers to clear ``ahead`` queued requests at full batches.

    Full batches of the fastest level the request's floor allows, each at its safe
    bound: not the best case (the request's own run is judged on the mean, in
    ``hopeless_at``), but the queue ahead is many batches, and one of them running
    slow delays everyone behind it. Priced at the mean instead, admission lets in
    more under overload and the simulator's attainment falls by 0.8 points on
    average, worse in 12 of 20
    overloaded runs (x1000-x4000, 5 seeds, with and without a 10 ms interactive
    deadline).
    """
    if ahead <= 0:
        return 0.0
    i = fastest_allowed(min_accuracy, ctx)
    per_batch_ms = ctx.table.safe(ctx.bucket, i, ctx.max_batch) + ctx.overhead_ms
    full_batches = ahead // ctx.max_batch  # a partial batch can still take the new request along
    return full_batches * per_batch_ms / ctx.workers


def fastest_allowed(min_accuracy: float, ctx: PlanContext) -> int:
    """Index of the fastest level meeting the floor; the most accurate level if none does."""
    return ctx.table.fastest_index(ctx.bucket, ctx.accuracy, min_accuracy)


FRONTEND_BATCH_SHARE = 0.5
"""The share of the frontend's spare capacity (one core less its per-request load) that its per-batch load may
take before the planner forms larger batches. Half: the frontend (a one-thread event loop) then runs at
(1 + per-request load) / 2 of a core at most, 0.85 when requests alone take 0.7, where an M/G/1 queue's wait
is still a few service times (~load / (1 - load)); a fixed bound such as 0.7 would ask for the largest batch
whenever requests alone take 0.7, and wait the whole slack for it."""


FRONTEND_FILL_FACTOR = 2.0
"""A wait for a larger batch lasts at most this many times the expected time for the batch to fill at the
arrival rate, from the head's arrival: a slack of seconds (a relaxed class) is no reason to hold a request
seconds for company that, at the measured rate, should have come in milliseconds."""


def frontend_batch_target(ctx: PlanContext) -> int:
    """The smallest mean batch size that keeps the frontend's per-batch load within FRONTEND_BATCH_SHARE of its
    spare capacity at the arrival rate: 1 (no waiting) while the frontend is far from saturation or its costs
    are unknown, ``ctx.max_batch`` once the per-request load alone fills the core.

    Per-request load u = rate x per-request ms; per-batch load = (rate / n) x per-batch ms <= share x (1 - u)
    gives n >= rate x per-batch ms / (share x (1 - u))."""
    rate = ctx.arrival_per_s
    per_batch_s = ctx.frontend_batch_ms * 1e-3
    if rate <= 0.0 or per_batch_s <= 0.0:
        return 1
    room = FRONTEND_BATCH_SHARE * (1.0 - rate * ctx.frontend_request_ms * 1e-3)
    need = rate * per_batch_s
    if room * ctx.max_batch <= need:
        return ctx.max_batch
    n = math.ceil(need / room)
    return n if n > 1 else 1


_CHOSEN = {False: "largest feasible batch, then the most accurate level",
           True: "largest feasible batch, then the fastest level"}
"""Plan.reason of a batch that makes its deadline, by accuracy mode (constant strings: hot path)."""
_LATE = "late: fastest allowed level"
"""Plan.reason of a batch that cannot make its earliest deadline."""


class SLOAwarePolicy(Policy):
    """slonn's policy: EDF, then the largest batch and the best level that meet the deadline and the floor."""

    def __init__(self, recent: RecentSlowdown | None = None, frontend: bool = True) -> None:
        super().__init__("slonn", may_wait=frontend)
        self.frontend = frontend
        """Plan for the frontend's cost too (``slonn:frontend=0`` turns it off): when the frontend's load nears
        saturation, wait for a batch of :func:`frontend_batch_target` requests while the head's slack allows
        (see :meth:`wait_until`). Without learned frontend costs in the context it never waits."""
        self._margin_ctx: PlanContext | None = None
        self._margin_s: dict[float, float] = {}
        self.recent = recent if recent is not None else RecentSlowdown(tau_s=0.0)
        """Scales the table's mean by how the last batches ran against it, and bounds batches with that times
        the factor's own error margin instead of the table's safe prediction, once the margin is known (batch
        and level choice only: admission and early drop judge the table's mean, so a burst of slow batches
        does not turn requests away). Off by default (``tau_s`` = 0); ``slonn:recent_tau_ms=60`` turns it
        on."""

    def order_key(self, p: Pending) -> tuple:
        return edf_key(p)

    def is_hopeless(self, p: Pending, now_s: float, ctx: PlanContext) -> bool:
        return now_s > self.hopeless_at(p, ctx)

    def hopeless_at(self, p: Pending, ctx: PlanContext) -> float:
        # The margin depends only on the context and the floor: remembered for the last context seen
        # (the simulator reuses its contexts; the dispatcher builds one per decision).
        if ctx is not self._margin_ctx:
            self._margin_ctx, self._margin_s = ctx, {}
        margin = self._margin_s.get(p.min_accuracy)
        if margin is None:
            # "Cannot make it" is judged on the *expected* run (the mean), not the safe upper bound that
            # plans batches: rejecting on the bound turns a ~1% risk of a late answer into a certain
            # miss. On a noisy VM live refits can put the batch-1 bound at ~18 ms against a ~2.5 ms
            # median, and admission would turn away interactive requests with nothing queued ahead.
            i = fastest_allowed(p.min_accuracy, ctx)
            margin = self._margin_s[p.min_accuracy] = (
                ctx.backlog_ms + ctx.table.mean(ctx.bucket, i, 1) + ctx.overhead_ms) * 1e-3
        return p.deadline_s - margin

    def observe(self, plan: Plan, exec_ms: float, deadline_met: bool, finished_s: float) -> None:
        self.recent.observe(finished_s, exec_ms, plan.table_mean_ms, plan.speed)

    def wait_until(self, head: Pending, count: int, now_s: float, ctx: PlanContext) -> float | None:
        """Wait for a larger batch while the frontend nears saturation: with fewer than
        :func:`frontend_batch_target` candidates, until the earlier of

        - the time the batch should have filled at the arrival rate: FRONTEND_FILL_FACTOR x (target - 1) /
          rate after the head arrived (the head is the earliest deadline, EDF; anchored at its arrival, so a
          rate that has fallen since it was measured cannot hold a request longer, however often the decision
          is taken again), and
        - the latest time a batch of the target size still makes the head's deadline at the slowest level,
          once the overhead allowance (which has learned the frontend's delays) and the batch's own frontend
          cost are paid: whichever level the batch then gets still fits its deadline.

        None (plan now) at or past it, with enough candidates, or at low load. An arrival decides again
        before then."""
        if not self.frontend or ctx.arrival_per_s <= 0.0 or ctx.frontend_batch_ms <= 0.0:
            return None
        target = frontend_batch_target(ctx)
        if count >= target:
            return None
        rows, scale = self._rows(now_s, ctx)
        slowest = 0.0
        for row in rows:
            if row[target - 1] > slowest:
                slowest = row[target - 1]
        latest_s = head.deadline_s - (slowest * scale + ctx.overhead_ms + ctx.frontend_batch_ms) * 1e-3
        filled_s = head.arrival_s + FRONTEND_FILL_FACTOR * (target - 1) / ctx.arrival_per_s
        if filled_s < latest_s:
            latest_s = filled_s
        return latest_s if now_s < latest_s else None

    def _rows(self, now_s: float, ctx: PlanContext) -> tuple[list[list[float]], float]:
        """The rows batches are bounded with and what to multiply them by (see ``recent``)."""
        margin = self.recent.margin()
        if margin > 0.0:  # bound = table mean x factor x the factor's error margin
            return ctx.table.mean_rows(ctx.bucket), self.recent.factor(now_s) * margin
        return ctx.table.safe_rows(ctx.bucket), 1.0  # the table's safe prediction (the recent slowdown off)

    def plan(self, candidates: Sequence[Pending], now_s: float, ctx: PlanContext) -> Plan | Wait:
        n_max = min(len(candidates), ctx.max_batch)
        if n_max == 0:
            raise ValueError("plan() needs at least one candidate")
        if self.frontend and ctx.arrival_per_s > 0.0:
            until_s = self.wait_until(candidates[0], n_max, now_s, ctx)
            if until_s is not None:
                return Wait(until_s)
        speed = self.recent.factor(now_s)
        rows, scale = self._rows(now_s, ctx)
        if n_max == 1:  # one candidate (most decisions at low load): no prefixes to build
            return self._plan_one(candidates, now_s, ctx, rows, scale, speed)
        return self._plan_prefixes(candidates, n_max, now_s, ctx, rows, scale, speed)

    def _plan_prefixes(self, candidates: Sequence[Pending], n_max: int, now_s: float, ctx: PlanContext,
                       rows: list[list[float]], scale: float, speed: float) -> Plan:
        table, accuracy = ctx.table, ctx.accuracy
        # Prefix constraints of the batch made of the first n candidates: the highest floor, and the
        # time budget (ms) left for exec by the earliest deadline once the overhead is paid, divided by
        # ``scale`` so that it compares with ``rows`` (bound = row x scale).
        floors, budgets, slacks = [], [], []
        floor, deadline = 0.0, float("inf")
        for p in candidates[:n_max]:
            if p.min_accuracy > floor:
                floor = p.min_accuracy
            if p.deadline_s < deadline:
                deadline = p.deadline_s
            floors.append(floor)
            slacks.append((deadline - now_s) * 1e3)
            budgets.append((slacks[-1] - ctx.overhead_ms) / scale)
        accuracy_mode = candidates[0].mode == Mode.ACCURACY
        best_n, best_i = 0, -1
        for i, acc in enumerate(accuracy):
            # The floor caps the batch: a later candidate with a higher floor would exclude this level.
            n = _max_feasible(rows[i], bisect.bisect_right(floors, acc), budgets)
            if n > best_n or (n == best_n and n and self._better(i, best_i, n, accuracy_mode, rows, accuracy)):
                best_n, best_i = n, i
        if best_n == 0:
            # Even the head alone is late on the bound at the fastest level its floor allows: run it there,
            # with the followers that level serves (their floors) and that the batch does not make late.
            i = fastest_allowed(candidates[0].min_accuracy, ctx)
            n = _late_batch(rows[i], max(1, bisect.bisect_right(floors, accuracy[i])), candidates, now_s,
                            ctx.overhead_ms, scale)
            return Plan(n, table.levels[i], rows[i][n - 1] * scale, late=True, reason=_LATE,
                        slack_ms=slacks[0], candidates=len(candidates),
                        table_mean_ms=table.mean(ctx.bucket, i, n), speed=speed)
        return Plan(best_n, table.levels[best_i], rows[best_i][best_n - 1] * scale, reason=_CHOSEN[accuracy_mode],
                    slack_ms=slacks[best_n - 1], candidates=len(candidates),
                    table_mean_ms=table.mean(ctx.bucket, best_i, best_n), speed=speed)

    def _plan_one(self, candidates: Sequence[Pending], now_s: float, ctx: PlanContext,
                  rows: list[list[float]], scale: float, speed: float) -> Plan:
        """``plan`` for a batch of at most one: the same choice as the general path, without its lists."""
        p = candidates[0]
        accuracy = ctx.accuracy
        slack = (p.deadline_s - now_s) * 1e3
        budget = (slack - ctx.overhead_ms) / scale
        accuracy_mode = p.mode == Mode.ACCURACY
        best_i, best_acc, best_ms = -1, 0.0, 0.0
        for i, acc in enumerate(accuracy):
            ms = rows[i][0]
            if not (acc >= p.min_accuracy and ms <= budget):  # as the general path reads it, NaN included
                continue
            # _better at n = 1, inlined (this loop runs for most requests at low load)
            if best_i < 0 or (ms < best_ms if accuracy_mode or acc == best_acc else acc > best_acc):
                best_i, best_acc, best_ms = i, acc, ms
        if best_i < 0:
            i = fastest_allowed(p.min_accuracy, ctx)
            return Plan(1, ctx.table.levels[i], rows[i][0] * scale, late=True, reason=_LATE, slack_ms=slack,
                        candidates=len(candidates), table_mean_ms=ctx.table.mean(ctx.bucket, i, 1), speed=speed)
        return Plan(1, ctx.table.levels[best_i], rows[best_i][0] * scale, reason=_CHOSEN[accuracy_mode],
                    slack_ms=slack, candidates=len(candidates), table_mean_ms=ctx.table.mean(ctx.bucket, best_i, 1),
                    speed=speed)

    @staticmethod
    def _better(i: int, j: int, n: int, accuracy_mode: bool, rows: list[list[float]],
                accuracy: tuple[float, ...]) -> bool:
        """At equal batch size ``n``: latency mode prefers accuracy, accuracy mode prefers speed; ties in
        accuracy go to the faster level (a model whose levels 1.0..0.1 are equally accurate on held-out
        data must not run dense for nothing: the time is taken from the requests queued behind)."""
        faster = rows[i][n - 1] < rows[j][n - 1]
        if accuracy_mode or accuracy[i] == accuracy[j]:
            return faster
        return accuracy[i] > accuracy[j]


def _late_batch(row: list[float], n_floor: int, candidates: Sequence[Pending], now_s: float, overhead_ms: float,
                scale: float) -> int:
    """Size of a batch whose head is late on the bound ``row`` (x ``scale``), at most ``n_floor``.

    A follower joins unless that makes a request late that would not be otherwise: it must not push the batch
    past the budget of a member it runs in time, and it must not be one that would be late in this batch but
    in time in the next one, alone. One that is late either way joins: a backlog of late requests is caught up
    in full batches. Taking every follower the floors allow, up to ``max_batch``, would let a head that has
    just missed the bound make late those that the next batch would serve in time."""
    n, cap = 1, math.inf
    for k in range(1, n_floor):
        if row[k] > cap:
            break  # it would make a member late that this batch runs in time
        p = candidates[k]
        budget = ((p.deadline_s - now_s) * 1e3 - overhead_ms) / scale
        if budget >= row[k]:
            if budget < cap:
                cap = budget
        elif budget >= row[n - 1] + overhead_ms / scale + row[0]:
            break  # late in this batch, in time in the next one: leave it (and those after it) for that
        n = k + 1
    return n


def _max_feasible(row: list[float], n_floor: int, budgets: list[float]) -> int:
    """Largest n <= n_floor with safe exec ms ``row[n-1]`` within the first n's budget ``budgets[n-1]``.

    Latency grows with n and the earliest deadline can only shrink, so
    feasibility is monotone in n: binary search.
    """
    lo, hi = 0, n_floor
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if row[mid - 1] <= budgets[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo
