"""Python clients for slonn (sync and asyncio) over the generated stubs.

    with SlonnClient("localhost:50051") as client:
        result = client.infer("digits-mlp", "interactive", x)   # x: 64 float32 features
        print(result.output.argmax(), result.level, result.exec_ms)

Errors arrive as ``grpc.RpcError`` with the server's status code and message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterable, AsyncIterator

import grpc
import numpy as np

from slonn.protos import slonn_pb2 as pb
from slonn.protos import slonn_pb2_grpc as pb_grpc
from slonn.protos.tensors import to_tensor

_OPTIONS = [("grpc.max_receive_message_length", 1 << 20), ("grpc.max_send_message_length", 1 << 20)]


@dataclass(frozen=True)
class InferResult:
    output: np.ndarray
    request_id: str
    level: float
    expected_accuracy: float
    queue_ms: float
    exec_ms: float
    predicted_ms: float
    batch_size: int
    late: bool
    kernel: str
    server_ms: float
    """Time inside the server's handler (receive to response built)."""
    out_of_range_features: int = 0
    """Features of the input far outside the model's training range (served anyway, flagged)."""

    @classmethod
    def from_proto(cls, r: pb.InferResponse) -> "InferResult":
        out = np.frombuffer(r.output.data, dtype="<f4").reshape(tuple(r.output.shape))
        return cls(out, r.request_id, r.level, r.expected_accuracy, r.queue_ms, r.exec_ms, r.predicted_ms,
                   r.batch_size, r.late, r.kernel, r.server_ms, r.out_of_range_features)


def make_request(model: str, slo_class: str, x: np.ndarray, request_id: str = "",
                 latency_budget_ms: float = 0.0) -> pb.InferRequest:
    return pb.InferRequest(model=model, slo_class=slo_class, input=to_tensor(np.asarray(x, np.float32)),
                           request_id=request_id, latency_budget_ms=latency_budget_ms)


class SlonnClient:
    """Blocking client."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=_OPTIONS)
        self.stub = pb_grpc.InferenceStub(self.channel)

    def infer(self, model: str, slo_class: str, x: np.ndarray, request_id: str = "",
              latency_budget_ms: float = 0.0, timeout_s: float | None = None) -> InferResult:
        req = make_request(model, slo_class, x, request_id, latency_budget_ms)
        return InferResult.from_proto(self.stub.Infer(req, timeout=timeout_s))

    def list_models(self, timeout_s: float | None = 10.0) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "SlonnClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncSlonnClient:
    """asyncio client (grpc.aio); also the streaming call for high-rate senders."""

    def __init__(self, target: str, own_connection: bool = False) -> None:
        """``own_connection``: a TCP connection of this client's alone. By default gRPC shares one among the
        channels of a process to the same target, and a server of several frontends (`slonn serve
        --frontends N`) then sees them all on one frontend."""
        options = [*_OPTIONS, ("grpc.use_local_subchannel_pool", 1)] if own_connection else _OPTIONS
        self.channel = grpc.aio.insecure_channel(target, options=options)
        self.stub = pb_grpc.InferenceStub(self.channel)

    async def infer(self, model: str, slo_class: str, x: np.ndarray, request_id: str = "",
                    latency_budget_ms: float = 0.0, timeout_s: float | None = None) -> InferResult:
        req = make_request(model, slo_class, x, request_id, latency_budget_ms)
        return InferResult.from_proto(await self.stub.Infer(req, timeout=timeout_s))

    async def infer_stream(self, requests: AsyncIterable[pb.InferRequest]) -> AsyncIterator[pb.StreamResponse]:
        """Send many requests on one stream; yields StreamResponse (a response or a per-request error)."""
        call = self.stub.InferStream(requests)
        async for answer in call:
            yield answer

    async def list_models(self, timeout_s: float | None = 10.0) -> pb.ListModelsResponse:
        return await self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout_s)

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        await asyncio_wait_ready(self.channel, timeout_s)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncSlonnClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def asyncio_wait_ready(channel: grpc.aio.Channel, timeout_s: float) -> None:
    import asyncio

    await asyncio.wait_for(channel.channel_ready(), timeout_s)
