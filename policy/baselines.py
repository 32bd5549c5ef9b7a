"""Baseline scheduling policies, behind the same ``Policy`` protocol as slonn's planner.

- ``triton``: dense dynamic batching as Triton's dynamic batcher does it. FIFO;
  level 1.0 only; dispatch at once when ``max_batch`` requests (or a preferred
  batch size) are queued, or when the oldest queued request has waited
  ``max_delay_ms``; else wait until that moment. No early drop: requests are
  never judged hopeless, a late request is served late.
- ``fixed:<level>``: the same dynamic batching at one fixed level.
- ``aimd``: Clipper-style adaptive batching. FIFO, dense, no delay; the batch
  cap grows by ``step`` after every batch that was within its latency
  objective and is multiplied by ``backoff`` after a miss. As in Clipper the
  objective is on the batch's processing latency (exec + overhead <= the
  tightest SLO of the batch), so a long queue does not shrink the batches
  (``signal=deadline`` uses whether every request met its end-to-end deadline
  instead).

Names carry parameters: ``triton``, ``triton:max_delay_ms=5``,
``triton:max_batch=32,preferred=8/16``, ``fixed:0.25``,
``fixed:0.1,max_delay_ms=2``, ``aimd:step=2,backoff=0.5``.

Baselines ignore accuracy floors on purpose: Triton and Clipper know nothing
about them (``fixed:<level>`` may serve below a class's floor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from slonn.policy.names import PolicyName
from slonn.policy.planner import Pending, Plan, PlanContext, Policy, Wait, fifo_key


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching knobs (Triton's ``dynamic_batching`` block)."""

    level: float = 1.0
    """Keep fraction every batch runs at (must be one of the model's levels)."""
    max_delay_ms: float = 1.0
    """Triton's max_queue_delay: how long the oldest request may wait for a fuller batch (>= 0)."""
    max_batch: int = 0
    """Largest batch (>= 0); 0 = the server's max_batch."""
    preferred: tuple[int, ...] = ()
    """Preferred batch sizes: dispatch at once when one of them can be formed."""

    def __post_init__(self) -> None:
        if not 0.0 < self.level <= 1.0:
            raise ValueError(f"level={self.level} must be in (0, 1], e.g. fixed:0.25")
        if not self.max_delay_ms >= 0:
            raise ValueError(f"max_delay_ms={self.max_delay_ms} must be >= 0")
        if self.max_batch < 0 or any(b < 1 for b in self.preferred):
            raise ValueError(f"max_batch={self.max_batch} must be >= 0 and preferred={self.preferred} sizes >= 1")


class DynamicBatchingPolicy(Policy):
    """Triton-style dynamic batching at one fixed level (``triton`` is level 1.0)."""

    def __init__(self, config: BatchingConfig = BatchingConfig(), name: str = "triton") -> None:
        super().__init__(name, may_wait=True)
        self.config = config
        self._preferred_desc = tuple(sorted(set(config.preferred), reverse=True))

    def order_key(self, p: Pending) -> tuple:
        return fifo_key(p)

    def is_hopeless(self, p: Pending, now_s: float, ctx: PlanContext) -> bool:
        return False  # no early drop: Triton serves a late request late

    def hopeless_at(self, p: Pending, ctx: PlanContext) -> None:
        return None

    def observe(self, plan: Plan, exec_ms: float, deadline_met: bool, finished_s: float) -> None:
        pass

    def _level_index(self, ctx: PlanContext) -> int:
        try:
            return ctx.table.level_index(self.config.level)
        except KeyError:
            raise ValueError(f"policy {self.name!r}: level {self.config.level} is not one of the model's "
                             f"levels {ctx.table.levels}") from None

    def _cap(self, ctx: PlanContext) -> int:
        return min(self.config.max_batch or ctx.max_batch, ctx.max_batch)

    def wait_until(self, head: Pending, count: int, now_s: float, ctx: PlanContext) -> float | None:
        cap = self._cap(ctx)
        n = min(count, cap)
        if n >= cap or (self._preferred_desc and self._preferred_desc[-1] <= n):
            return None  # a full or a preferred batch goes at once
        until_s = head.arrival_s + self.config.max_delay_ms * 1e-3  # FIFO: the head is the oldest
        return until_s if now_s < until_s else None

    def plan(self, candidates: Sequence[Pending], now_s: float, ctx: PlanContext) -> Plan | Wait:
        if not candidates:
            raise ValueError("plan() needs at least one candidate")
        i = self._level_index(ctx)  # a level the model lacks fails here, not at the first dispatch
        until_s = self.wait_until(candidates[0], len(candidates), now_s, ctx)
        if until_s is not None:
            return Wait(until_s)
        cap = self._cap(ctx)
        n = min(len(candidates), cap)
        level = ctx.table.levels[i]
        if n >= cap:
            return Plan(n, level, ctx.table.safe(ctx.bucket, i, n), reason="max batch")
        for size in self._preferred_desc:
            if size <= n:
                return Plan(size, level, ctx.table.safe(ctx.bucket, i, size), reason=f"preferred batch {size}")
        return Plan(n, level, ctx.table.safe(ctx.bucket, i, n), reason="max queue delay")


@dataclass(frozen=True)
class AIMDConfig:
    """Clipper's additive-increase / multiplicative-decrease batch sizing."""

    start: int = 1
    """Initial batch cap (>= 1)."""
    step: float = 1.0
    """Added to the cap after a batch that met every deadline (> 0)."""
    backoff: float = 0.9
    """The cap is multiplied by this after a miss (Clipper backs off by 10%), in (0, 1)."""
    level: float = 1.0
    """Keep fraction (Clipper serves the dense model)."""
    signal: str = "exec"
    """"exec": a miss is exec + overhead above the batch's tightest SLO (Clipper); "deadline": a missed deadline."""

    def __post_init__(self) -> None:
        if self.start < 1 or not self.step > 0 or not 0.0 < self.backoff < 1.0 or not 0.0 < self.level <= 1.0:
            raise ValueError(f"AIMDConfig({self}): need start >= 1, step > 0, 0 < backoff < 1, 0 < level <= 1")
        if self.signal not in ("exec", "deadline"):
            raise ValueError(f"AIMDConfig.signal={self.signal!r} must be 'exec' or 'deadline'")


class AIMDPolicy(Policy):
    """FIFO, dense, no queue delay; the batch cap adapts to whether batches make their deadlines."""

    def __init__(self, config: AIMDConfig = AIMDConfig()) -> None:
        super().__init__("aimd")
        self.config = config
        self.cap = float(config.start)
        """Current batch cap (fractional: additive steps may be < 1)."""
        self._limit = float("inf")
        """Largest cap worth growing to: the max_batch of the last context seen."""
        self._objective_ms: dict[int, float] = {}
        """id(plan) -> (tightest SLO of its batch - overhead), until observe() sees the plan."""

    def order_key(self, p: Pending) -> tuple:
        return fifo_key(p)

    def is_hopeless(self, p: Pending, now_s: float, ctx: PlanContext) -> bool:
        return False  # Clipper does not drop early

    def hopeless_at(self, p: Pending, ctx: PlanContext) -> None:
        return None

    def plan(self, candidates: Sequence[Pending], now_s: float, ctx: PlanContext) -> Plan:
        if not candidates:
            raise ValueError("plan() needs at least one candidate")
        self._limit = float(ctx.max_batch)
        n = max(1, min(len(candidates), int(self.cap), ctx.max_batch))
        try:
            i = ctx.table.level_index(self.config.level)
        except KeyError:
            raise ValueError(f"policy 'aimd': level {self.config.level} is not one of {ctx.table.levels}") from None
        plan = Plan(n, ctx.table.levels[i], ctx.table.safe(ctx.bucket, i, n), reason=f"aimd cap {self.cap:.2f}")
        slo_s = min(p.deadline_s - p.arrival_s for p in candidates[:n])
        self._objective_ms[id(plan)] = slo_s * 1e3 - ctx.overhead_ms
        return plan

    def observe(self, plan: Plan, exec_ms: float, deadline_met: bool, finished_s: float) -> None:
        objective_ms = self._objective_ms.pop(id(plan), float("inf"))
        met = deadline_met if self.config.signal == "deadline" else exec_ms <= objective_ms
        if met:
            self.cap = min(self.cap + self.config.step, self._limit)
        else:
            self.cap = max(1.0, self.cap * self.config.backoff)


# --------------------------------------------------------------------------- names


def parse_policy_params(text: str, where: str, known: set[str]) -> dict[str, str]:
    """``k=v,k=v`` of policy ``where`` (its full name, for messages); a key outside ``known`` is an error."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"policy {where!r}: parameter {item!r} must look like key=value")
        out[key.strip()] = value.strip()
    unknown = set(out) - known
    if unknown:
        raise ValueError(f"policy {where!r}: unknown parameter(s) {sorted(unknown)}; known: {sorted(known)}")
    return out


_BATCHING_PARAMS = {"max_delay_ms", "max_batch", "preferred"}


def _batching_config(params: dict[str, str], level: float) -> BatchingConfig:
    preferred = tuple(int(s) for s in params.get("preferred", "").split("/") if s)
    return BatchingConfig(level=level, max_delay_ms=float(params.get("max_delay_ms", 1.0)),
                          max_batch=int(params.get("max_batch", 0)), preferred=preferred)


BASELINES = (PolicyName.TRITON.value, f"{PolicyName.FIXED.value}:<level>", PolicyName.AIMD.value)


def make_baseline(name: str):
    """A baseline policy from its name, e.g. "triton", "triton:max_delay_ms=5", "fixed:0.25", "aimd:step=2"."""
    kind, _, rest = name.partition(":")
    try:
        if kind == PolicyName.TRITON:
            return DynamicBatchingPolicy(_batching_config(parse_policy_params(rest, name, _BATCHING_PARAMS), 1.0),
                                         name)
        if kind == PolicyName.FIXED:
            head, _, tail = rest.partition(",")
            if not head or "=" in head:
                raise ValueError(f"policy {name!r}: fixed needs a level first, e.g. fixed:0.25")
            return DynamicBatchingPolicy(
                _batching_config(parse_policy_params(tail, name, _BATCHING_PARAMS), float(head)), name)
        if kind == PolicyName.AIMD:
            types = {"start": int, "step": float, "backoff": float, "level": float, "signal": str}
            params = parse_policy_params(rest, name, set(types))
            return AIMDPolicy(AIMDConfig(**{k: types[k](v) for k, v in params.items()}))
    except ValueError as exc:
        if str(exc).startswith("policy "):
            raise
        raise ValueError(f"policy {name!r}: {exc}") from None
    raise ValueError(f"unknown policy {name!r}; choose slonn or a baseline: {', '.join(BASELINES)}")
