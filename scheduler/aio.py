"""Which asyncio event loop the server and the load generator run on.

``asyncio`` is the standard library's loop; ``uvloop`` (libuv; a core dependency on Linux and macOS, and
``pip install uvloop`` elsewhere it builds) costs less CPU per event, which matters where the frontend, the
workers and the load generator share two cores (docs/results.md, "Front-end cost"). It is the default wherever it is
installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any, Coroutine

EVENT_LOOPS = ("asyncio", "uvloop")
DEFAULT_EVENT_LOOP = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
"""What ``--event-loop`` flags default to: uvloop where installed, else the standard loop."""


def run(coro: Coroutine[Any, Any, Any], event_loop: str = DEFAULT_EVENT_LOOP) -> Any:
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
