"""A scheduling policy from its spec (``slonn serve --policy``, ``slonn simulate --policy``): the server and
the simulator build theirs here, so the same spec means the same policy in both."""

from __future__ import annotations

from slonn.policy.baselines import make_baseline, parse_policy_params
from slonn.policy.names import PolicyName
from slonn.policy.planner import Policy, RecentSlowdown, SLOAwarePolicy


def make_policy(name: str) -> Policy:
    """Policy by name: slonn (``slonn:recent_tau_ms=T`` plans with a recent-slowdown factor of time constant T;
    the default 0 is off; ``slonn:frontend=0`` plans by model latency alone, ignoring the frontend's cost), or a baseline from policy/baselines.py."""
    kind, _, rest = name.partition(":")
    if kind == PolicyName.SLONN:
        params = parse_policy_params(rest, name, {"recent_tau_ms", "frontend"})
        frontend = params.get("frontend", "1")
        if frontend not in ("0", "1"):
            raise ValueError(f"policy {name!r}: frontend must be 0 or 1, got {frontend!r}")
        if "recent_tau_ms" not in params:
            return SLOAwarePolicy(frontend=frontend == "1")
        try:
            tau_s = float(params["recent_tau_ms"]) * 1e-3
            return SLOAwarePolicy(RecentSlowdown(tau_s=tau_s), frontend=frontend == "1")
        except ValueError as exc:
            raise ValueError(f"policy {name!r}: recent_tau_ms must be a number >= 0 ({exc})") from None
    return make_baseline(name)
