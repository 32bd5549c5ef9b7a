"""Process start-up hygiene shared by the server, its workers and the load generator."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Move everything allocated so far (modules, torch, scikit-learn, grpc: ~240k objects in the server)
    out of the garbage collector's reach.

    A full collection walks every tracked object: ~40 ms here, long enough to stall the event loop past
    a 25 ms deadline, a worker's batch by tens of ms, or the load generator's sending and timing, and it
    comes at the allocation-heavy moments, that is, in bursts. Objects made at start-up live as long as
    the process, so scanning them again finds nothing (CPython's gc.freeze, as used by Instagram's Django
    fleet). Call once, after start-up.
    """
    gc.collect()
    gc.freeze()
