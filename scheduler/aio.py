"""Which asyncio event loop the server and the load generator run on.

``asyncio`` is the standard library's loop; ``uvloop`` (libuv, optional: ``pip install uvloop``, or ``pip install -e '.[uvloop]'`` from the checkout)
costs less CPU per event, which matters where the frontend, the workers and the load generator share two
cores (docs/results.md, "Front-end cost").
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine

EVENT_LOOPS = ("asyncio", "uvloop")


def run(coro: Coroutine[Any, Any, Any], event_loop: str = "asyncio") -> Any:
    """``asyncio.run(coro)`` on the chosen loop."""
    if event_loop not in EVENT_LOOPS:
        coro.close()
        raise ValueError(f"event_loop={event_loop!r} must be one of {EVENT_LOOPS}")
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            coro.close()
            raise SystemExit("--event-loop uvloop: uvloop is not installed (pip install uvloop, or "
                             "pip install -e '.[uvloop]' in the checkout)") from None
        return uvloop.run(coro)
    return asyncio.run(coro)
