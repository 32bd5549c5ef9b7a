"""Python clients for slonn (sync and asyncio) over the generated stubs.

    with SlonnClient("localhost:50051") as client:
        result = client.infer("digits-mlp", "interactive", x)   # x: 64 float32 features
        print(result.output.argmax(), result.level, result.exec_ms)
        many = client.infer_many("digits-mlp", "batch", xs)      # xs: [N, 64], one call, one deadline
        print(many.output.argmax(axis=1), [s.level for s in many.samples])

Errors arrive as ``grpc.RpcError`` with the server's status code and message. A server behind TLS or a
bearer token (``slonn serve --tls-cert ... --auth-token-file ...``) takes a :class:`ClientSecurity`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterable, AsyncIterator

import grpc
import numpy as np

from slonn.protos import slonn_pb2 as pb
from slonn.protos import slonn_pb2_grpc as pb_grpc
from slonn.protos.tensors import to_tensor

_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]
"""gRPC's default send limit (none: the server's --max-message-bytes is the one that counts) and a receive
limit far above any answer's size (outputs are [N, classes])."""


@dataclass(frozen=True)
class SampleResult:
    """How one sample was served."""

    level: float
    expected_accuracy: float
    queue_ms: float
    exec_ms: float
    predicted_ms: float
    batch_size: int
    late: bool
    kernel: str
    out_of_range_features: int


@dataclass(frozen=True)
class InferResult:
    """One call's answer. For N samples, ``output`` is [N, classes], the scalar facts are the worst case over
    the N, and ``samples`` holds each sample's facts in input order (for one sample: its own, once)."""

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
    samples: tuple[SampleResult, ...] = ()

    @classmethod
    def from_proto(cls, r: pb.InferResponse) -> "InferResult":
        out = np.frombuffer(r.output.data, dtype="<f4").reshape(tuple(r.output.shape))
        per = r.samples or (r,)  # one sample: the response's own fields are its facts
        samples = tuple(SampleResult(s.level, s.expected_accuracy, s.queue_ms, s.exec_ms, s.predicted_ms,
                                     s.batch_size, s.late, s.kernel, s.out_of_range_features) for s in per)
        return cls(out, r.request_id, r.level, r.expected_accuracy, r.queue_ms, r.exec_ms, r.predicted_ms,
                   r.batch_size, r.late, r.kernel, r.server_ms, r.out_of_range_features, samples)


def make_request(model: str, slo_class: str, x: np.ndarray, request_id: str = "",
                 latency_budget_ms: float = 0.0) -> pb.InferRequest:
    """A request for one sample (``x``: [features] or [1, features]) or N samples (``x``: [N, features])."""
    return pb.InferRequest(model=model, slo_class=slo_class, input=to_tensor(np.asarray(x, np.float32)),
                           request_id=request_id, latency_budget_ms=latency_budget_ms)


@dataclass(frozen=True)
class ClientSecurity:
    """How to reach a server that speaks TLS or wants a bearer token."""

    tls: bool = False
    """Speak TLS, verifying the server against the system's CAs (implied by ``ca_file``)."""
    ca_file: Path | None = None
    """PEM CA certificate(s) to verify the server's certificate against (a private CA, a self-signed one)."""
    cert_file: Path | None = None
    """PEM client certificate, for a server requiring mutual TLS (with ``key_file``)."""
    key_file: Path | None = None
    token_file: Path | None = None
    """A file holding the bearer token sent with every call."""

    def credentials(self) -> grpc.ChannelCredentials | None:
        """The channel's TLS credentials, or None for plaintext."""
        if not (self.tls or self.ca_file or self.cert_file):
            return None
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs its key: give both --tls-cert and --tls-key")
        read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every call carries: the bearer token, if any."""
        if self.token_file is None:
            return ()
        return (("authorization", f"Bearer {Path(self.token_file).read_text().strip()}"),)


def add_security_args(p: argparse.ArgumentParser) -> None:
    """The client's TLS and token flags (see :class:`ClientSecurity`)."""
    p.add_argument("--tls", action="store_true", help="speak TLS, verifying the server against the system's CAs")
    p.add_argument("--tls-ca", type=Path, default=None, metavar="PEM",
                   help="speak TLS, verifying the server against this CA certificate")
    p.add_argument("--tls-cert", type=Path, default=None, metavar="PEM",
                   help="client certificate, for a server requiring mutual TLS (with --tls-key)")
    p.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="the private key of --tls-cert")
    p.add_argument("--auth-token-file", type=Path, default=None, metavar="FILE",
                   help="send the bearer token in this file with every call")


def security_from_args(args) -> ClientSecurity:
    return ClientSecurity(tls=args.tls, ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key,
                          token_file=args.auth_token_file)


class SlonnClient:
    """Blocking client."""

    def __init__(self, target: str, security: ClientSecurity | None = None) -> None:
        security = security or ClientSecurity()
        credentials = security.credentials()
        self.channel = (grpc.secure_channel(target, credentials, options=_OPTIONS) if credentials
                        else grpc.insecure_channel(target, options=_OPTIONS))
        self.metadata = security.metadata()
        self.stub = pb_grpc.InferenceStub(self.channel)

    def infer(self, model: str, slo_class: str, x: np.ndarray, request_id: str = "",
              latency_budget_ms: float = 0.0, timeout_s: float | None = None) -> InferResult:
        req = make_request(model, slo_class, x, request_id, latency_budget_ms)
        return InferResult.from_proto(self.stub.Infer(req, timeout=timeout_s, metadata=self.metadata))

    def infer_many(self, model: str, slo_class: str, xs: np.ndarray, request_id: str = "",
                   latency_budget_ms: float = 0.0, timeout_s: float | None = None) -> InferResult:
        """N samples (``xs``: [N, features]; N at most the server's max batch, max_inflight and the class's
        max_queue, see list_models) in one call with one deadline, admitted all or none;
        the answer's ``output`` is [N, classes] and ``samples`` each sample's facts, in input order. The call
        fails as a whole if any sample fails."""
        return self.infer(model, slo_class, _rows(xs), request_id, latency_budget_ms, timeout_s)

    def list_models(self, timeout_s: float | None = 10.0) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout_s, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "SlonnClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncSlonnClient:
    """asyncio client (grpc.aio); also the streaming call for high-rate senders."""

    def __init__(self, target: str, security: ClientSecurity | None = None, own_connection: bool = False) -> None:
        """``own_connection``: a TCP connection of this client's alone. By default gRPC shares one among the
        channels of a process to the same target, and a server of several frontends (`slonn serve
        --frontends N`) then sees them all on one frontend."""
        options = [*_OPTIONS, ("grpc.use_local_subchannel_pool", 1)] if own_connection else _OPTIONS
        security = security or ClientSecurity()
        credentials = security.credentials()
        self.channel = (grpc.aio.secure_channel(target, credentials, options=options) if credentials
                        else grpc.aio.insecure_channel(target, options=options))
        self.metadata = security.metadata()
        self.stub = pb_grpc.InferenceStub(self.channel)

    async def infer(self, model: str, slo_class: str, x: np.ndarray, request_id: str = "",
                    latency_budget_ms: float = 0.0, timeout_s: float | None = None) -> InferResult:
        req = make_request(model, slo_class, x, request_id, latency_budget_ms)
        return InferResult.from_proto(await self.stub.Infer(req, timeout=timeout_s, metadata=self.metadata))

    async def infer_many(self, model: str, slo_class: str, xs: np.ndarray, request_id: str = "",
                         latency_budget_ms: float = 0.0, timeout_s: float | None = None) -> InferResult:
        """:meth:`SlonnClient.infer_many`, awaited."""
        return await self.infer(model, slo_class, _rows(xs), request_id, latency_budget_ms, timeout_s)

    async def infer_stream(self, requests: AsyncIterable[pb.InferRequest]) -> AsyncIterator[pb.StreamResponse]:
        """Send many requests on one stream; yields StreamResponse (a response or a per-request error)."""
        call = self.stub.InferStream(requests, metadata=self.metadata)
        async for answer in call:
            yield answer

    async def list_models(self, timeout_s: float | None = 10.0) -> pb.ListModelsResponse:
        return await self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout_s, metadata=self.metadata)

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        await asyncio_wait_ready(self.channel, timeout_s)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncSlonnClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _rows(xs: np.ndarray) -> np.ndarray:
    xs = np.asarray(xs, np.float32)
    if xs.ndim != 2:
        raise ValueError(f"xs: shape {list(xs.shape)}, expected [N, features]")
    return xs


async def asyncio_wait_ready(channel: grpc.aio.Channel, timeout_s: float) -> None:
    import asyncio

    await asyncio.wait_for(channel.channel_ready(), timeout_s)
