"""Transport security, optional: TLS and mutual TLS from certificate files, and a bearer token.

One certificate serves both ports (gRPC and the Open Inference Protocol over HTTP). With a client CA, both
require a client certificate signed by it. With a token file, every call must carry
``authorization: Bearer <token>`` (gRPC metadata or HTTP header), compared in constant time; health and
readiness stay open, for load balancers and orchestrators that probe without credentials.
"""

from __future__ import annotations

import hmac
import logging
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import grpc
from aiohttp import web

log = logging.getLogger(__name__)

OPEN_GRPC_METHODS = frozenset({
    "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
    "/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady"})
"""Health and readiness: answered without a token."""
OPEN_HTTP_PATHS = re.compile(r"/v2/health/(live|ready)|/v2/models/[^/]+(/versions/[^/]+)?/ready")
"""The same over HTTP."""
UNAUTHENTICATED = "missing or wrong bearer token: send 'authorization: Bearer <token>'"


def read_file(path: Path, flag: str) -> bytes:
    """A certificate, key or token file's bytes; ValueError naming the flag when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {exc.strerror or exc}") from None


def read_token(path: Path, flag: str = "--auth-token-file") -> bytes:
    """The token in ``path`` (surrounding whitespace removed; ValueError if empty)."""
    token = read_file(path, flag).strip()
    if not token:
        raise ValueError(f"{flag} {path}: the file is empty")
    return token


def grpc_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS for the gRPC port; with ``client_ca``, clients must present a certificate it signed."""
    pair = (read_file(key, "--tls-key"), read_file(cert, "--tls-cert"))
    ca = read_file(client_ca, "--tls-client-ca") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def http_ssl_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """The same for the HTTP port (TLS 1.2 or later). ValueError naming the flags and files when the PEM
    files do not load (gRPC would only find out when the port is bound)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"--tls-cert {cert} / --tls-key {key}: cannot load a PEM certificate and its "
                         f"private key from them ({exc})") from None
    if client_ca:
        try:
            context.load_verify_locations(cafile=str(client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"--tls-client-ca {client_ca}: cannot load PEM CA certificates from it ({exc})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass(frozen=True)
class Security:
    """What the token and certificate flags load to; ``None`` fields: not configured."""

    token: BearerToken | None
    grpc_credentials: grpc.ServerCredentials | None
    ssl_context: ssl.SSLContext | None

    @property
    def tls(self) -> bool:
        return self.ssl_context is not None


def load(token_file: Path | None, cert: Path | None, key: Path | None, client_ca: Path | None) -> Security:
    """Read the token and certificate files; ValueError naming the flag and the file when one is unreadable,
    empty or not PEM. ``slonn serve`` calls it before anything starts, the server again at its start."""
    token = BearerToken(read_token(token_file)) if token_file else None
    if not (cert and key):
        return Security(token, None, None)
    ssl_context = http_ssl_context(cert, key, client_ca)  # checks the PEM files: gRPC does not until it binds
    return Security(token, grpc_credentials(cert, key, client_ca), ssl_context)


class BearerToken:
    """Checks an ``authorization`` value: the ``Bearer`` scheme (any case, RFC 7235), one space, the token,
    compared in constant time (``hmac.compare_digest``)."""

    def __init__(self, token: bytes) -> None:
        self._expected = token

    def allows(self, value: str | bytes | None) -> bool:
        if value is None:
            return False
        if isinstance(value, str):
            try:
                value = value.encode()
            except UnicodeEncodeError:  # bytes that were not UTF-8 (aiohttp keeps them as surrogates)
                return False
        scheme, space, token = value.partition(b" ")
        return bool(space) and scheme.lower() == b"bearer" and hmac.compare_digest(token, self._expected)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED to a call without the token, before its handler runs (health excepted)."""

    def __init__(self, token: BearerToken, on_denied: Callable[[], None] | None = None) -> None:
        self.token = token
        self.on_denied = on_denied
        """Called for each call refused (to count it)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in OPEN_GRPC_METHODS:
            return handler
        value = next((v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"), None)
        if self.token.allows(value):
            return handler
        if self.on_denied is not None:
            self.on_denied()
        return _denied(handler)


async def _deny(request, context) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)


async def _deny_stream(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
    yield  # never reached: a generator, as a streaming handler is


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED."""
    codec = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_deny, **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_deny_stream, **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_deny, **codec)
    return grpc.stream_stream_rpc_method_handler(_deny_stream, **codec)


def token_middleware(token: BearerToken, on_denied: Callable[[], None] | None = None) -> Callable:
    """aiohttp middleware: 401 with the Open Inference Protocol's error body without the token (health and
    readiness excepted); ``on_denied`` is called for each request refused."""

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if OPEN_HTTP_PATHS.fullmatch(request.path) or token.allows(request.headers.get("Authorization")):
            return await handler(request)
        if on_denied is not None:
            on_denied()
        return web.json_response({"error": UNAUTHENTICATED}, status=401,
                                 headers={"WWW-Authenticate": 'Bearer realm="slonn"'})

    return check
