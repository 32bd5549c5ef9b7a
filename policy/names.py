"""The names the SLO-class configuration, the policies and the command line share.

String enums (``enum.StrEnum``): each member equals its spelling in TOML files and on the command line
(``Mode.ACCURACY == "accuracy"``), so a value read from either compares with a member and ``Mode(text)``
validates it; ``repr`` too is the string's, so configurations and requests print as they are written.
Standard library only: the scheduler's configuration and the compiled planner both import it.
"""

from __future__ import annotations

from enum import StrEnum


class _Name(StrEnum):
    def __repr__(self) -> str:
        return repr(self.value)


class Mode(_Name):
    """What an SLO class trades (``[[class]] mode``)."""

    LATENCY = "latency"
    """Meet the deadline at the highest accuracy."""
    ACCURACY = "accuracy"
    """Meet the accuracy floor at the lowest latency."""


class OnLate(_Name):
    """What happens to a request of an SLO class once its deadline is out of reach (``[[class]] on_late``)."""

    REJECT = "reject"
    """Answer DEADLINE_EXCEEDED at once."""
    SERVE = "serve"
    """Serve it late, flagged."""


class PolicyName(_Name):
    """A scheduling policy by the name that starts its spec (``kind[:params]``, ``slonn serve --policy``)."""

    SLONN = "slonn"
    """The SLO-aware planner (policy/planner.py)."""
    TRITON = "triton"
    """Dense dynamic batching as Triton's dynamic batcher does it (policy/baselines.py)."""
    FIXED = "fixed"
    """The same dynamic batching at one fixed level (``fixed:<level>``)."""
    AIMD = "aimd"
    """Clipper-style adaptive batch size."""
