"""A bidirectional stream's answers in completion order, for both servicers (slonn.v1 and the Open Inference
Protocol)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterable, AsyncIterator, Awaitable, Callable, TypeVar

Req = TypeVar("Req")
Resp = TypeVar("Resp")


async def answer_in_completion_order(requests: AsyncIterable[Req],
                                     answer: Callable[[Req], Awaitable[Resp]]) -> AsyncIterator[Resp]:
    """Run ``answer`` on each request as it arrives, all at once, and yield the results as they finish.

    ``answer`` answers its own errors (it returns an error message rather than raise). When the caller
    leaves or the stream ends, every request still running is cancelled, so its queued samples leave the
    queues; a read error surfaces once the answers so far are out."""
    answers: asyncio.Queue = asyncio.Queue()
    tasks: set[asyncio.Task] = set()

    async def one(request: Req) -> None:
        answers.put_nowait(await answer(request))  # unbounded: no coroutine per answer

    async def read() -> None:
        async for request in requests:
            task = asyncio.create_task(one(request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*list(tasks), return_exceptions=True)
        answers.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (result := await answers.get()) is not None:
            yield result
        await reader
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()
