"""Time behind a small protocol, so tests and the simulator can own it."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic timeline."""
        ...


class MonotonicClock:
    """The real clock: time.monotonic()."""

    def now(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to (tests, the simulator)."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._now = start_s

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"FakeClock.advance({seconds}): time cannot go backwards")
        self._now += seconds

    def set(self, now_s: float) -> None:
        if now_s < self._now:
            raise ValueError(f"FakeClock.set({now_s}) is before now={self._now}")
        self._now = now_s
