"""A stream refuses a request id that is already in flight on it, and accepts it again once answered."""

from __future__ import annotations

import asyncio
import itertools

from slonn.protos import slonn_pb2 as pb
from slonn.scheduler.errors import RequestError
from slonn.scheduler.server import InferenceServicer


class HeldServicer(InferenceServicer):
    """The servicer's stream handling, with answers held until the test releases them."""

    def __init__(self) -> None:
        self._ids = itertools.count()
        self.calls = 0
        self.release = asyncio.Event()
        self.counted: list[RequestError] = []

    async def _answer(self, request, time_remaining_s):
        await self.release.wait()
        return pb.InferResponse(request_id=request.request_id)

    def _count(self, request, exc):
        self.counted.append(exc)


async def test_a_duplicate_id_in_flight_is_refused_in_stream_and_the_rest_are_answered():
    servicer = HeldServicer()
    first_answered = asyncio.Event()

    async def requests():
        for rid in ("a", "a", "b"):
            yield pb.InferRequest(request_id=rid)
        await first_answered.wait()
        yield pb.InferRequest(request_id="a")  # "a" was answered: its id is free again

    answers = []
    async with asyncio.timeout(10):
        async for answer in servicer.InferStream(requests(), None):
            answers.append(answer)
            if len(answers) == 1:  # the refusal comes first: the others are held
                servicer.release.set()
            if len(answers) == 3:
                first_answered.set()
    refused = answers[0]
    assert refused.WhichOneof("result") == "error"
    assert (refused.error.request_id, refused.error.code) == ("a", "INVALID_ARGUMENT")
    assert "request_id" in refused.error.message
    assert sorted(a.response.request_id for a in answers[1:]) == ["a", "a", "b"]
    assert all(a.WhichOneof("result") == "response" for a in answers[1:])
    assert len(servicer.counted) == 1
