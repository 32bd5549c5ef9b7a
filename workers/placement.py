"""Where and how urgently a process runs: niceness and CPU affinity.

The one place slonn changes either: co-runner children, the profiled worker, ``slonn serve --nice``,
``--worker-nice``, ``--cpus`` and ``--worker-cpus``, the load generator's thread. Light on purpose (no
torch): the co-runner's spawned children import it.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def set_niceness(value: int) -> int:
    """Set this thread's niceness to ``value`` (absolute) and return the niceness it runs at.

    On Linux niceness is per thread, and the threads and processes a thread starts later inherit it.
    Lowering it needs CAP_SYS_NICE: without it nothing changes, silently; callers that were asked for a
    niceness compare the result and say so.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, 0, value)
    except PermissionError:
        pass
    return os.getpriority(os.PRIO_PROCESS, 0)


def ask_niceness(value: int, what: str) -> int:
    """:func:`set_niceness`, with a warning naming ``what`` (the flag or the process asking) when it was
    refused; returns the niceness this thread runs at."""
    got = set_niceness(value)
    if got != value:
        log.warning("%s: niceness %d not permitted (raising priority needs CAP_SYS_NICE); running at niceness %d",
                    what, value, got)
    return got


def set_cpus(cpus: tuple[int, ...] | None) -> tuple[int, ...]:
    """Restrict this thread (and what it starts later) to ``cpus`` (None: leave it); returns the CPUs it may
    run on. Raises ValueError naming the CPUs when it cannot run on all of them (the kernel would quietly
    keep the ones it can, e.g. inside a container's cpuset)."""
    if cpus:
        before = sorted(os.sched_getaffinity(0))
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as exc:
            raise ValueError(f"cpus {list(cpus)}: cannot run there ({exc}); this process may use {before}") from None
        got = os.sched_getaffinity(0)
        if got != set(cpus):
            os.sched_setaffinity(0, before)
            raise ValueError(f"cpus {list(cpus)}: only {sorted(got)} of them are available here")
    return tuple(sorted(os.sched_getaffinity(0)))


def parse_cpus(text: str) -> tuple[int, ...]:
    """'1', '0,2' or '0-3' -> sorted CPU numbers; ValueError naming the text otherwise."""
    out: set[int] = set()
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not (lo.isdigit() and (hi.isdigit() if dash else not hi)) or int(hi or lo) < int(lo):
            raise ValueError(f"cpus {text!r}: expected CPU numbers such as 1, 0,2 or 0-3")
        out.update(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(out))
