"""The Open Inference Protocol over HTTP/REST (``/v2/...``), served by aiohttp on the gRPC server's event loop.

JSON bodies, with the binary tensor data extension (``Inference-Header-Content-Length``) that tritonclient
uses by default. Errors answer ``{"error": message}`` with the HTTP status of their gRPC code (_HTTP_STATUS);
a request the server cannot read (bad JSON, wrong shapes, unknown model) is a 4xx, never a 500.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web

from slonn.scheduler import oip
from slonn.scheduler.admission import admit_samples
from slonn.scheduler.errors import ErrorKind, InvalidArgument, RequestError
from slonn.scheduler.security import token_middleware

if TYPE_CHECKING:
    from slonn.scheduler.server import SlonnServer

log = logging.getLogger(__name__)
HEADER_LENGTH = "Inference-Header-Content-Length"
HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID_ARGUMENT: 400, ErrorKind.FAILED_PRECONDITION: 400, ErrorKind.NOT_FOUND: 404,
    ErrorKind.RESOURCE_EXHAUSTED: 429, ErrorKind.DEADLINE_EXCEEDED: 504, ErrorKind.UNAVAILABLE: 503,
    ErrorKind.INTERNAL: 500,
}
"""The HTTP status each request error answers with (as grpc-gateway maps the same gRPC statuses)."""


def error_response(exc: RequestError) -> web.Response:
    return web.json_response({"error": str(exc)}, status=HTTP_STATUS[exc.kind])


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except RequestError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own refusals (no such path, method, body too large) in the protocol's error body.
        return web.json_response({"error": f"{exc.reason}: {request.method} {request.path}"}, status=exc.status)


class OipHttp:
    """The /v2 routes on one aiohttp application, sharing the SlonnServer's dispatcher and manifests."""

    def __init__(self, server: "SlonnServer") -> None:
        self.server = server
        token = ([token_middleware(server.token, server.metrics.unauthenticated.labels("http").inc)]
                 if server.token else [])
        self.app = web.Application(middlewares=[*token, _errors], client_max_size=server.max_message_bytes)
        get, post = web.get, web.post
        self.app.add_routes([
            get("/v2", self.server_metadata), get("/v2/health/live", self.live),
            get("/v2/health/ready", self.ready),
            get("/v2/models/{model}", self.model_metadata),
            get("/v2/models/{model}/versions/{version}", self.model_metadata),
            get("/v2/models/{model}/ready", self.model_ready),
            get("/v2/models/{model}/versions/{version}/ready", self.model_ready),
            get("/v2/models/{model}/config", self.model_config),
            get("/v2/models/{model}/versions/{version}/config", self.model_config),
            post("/v2/models/{model}/infer", self.infer),
            post("/v2/models/{model}/versions/{version}/infer", self.infer)])
        self.runner: web.AppRunner | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                    reuse_port: bool = False) -> int:
        """Listen on host:port (0 = a free port), over TLS with ``ssl_context``; returns the bound port.
        ``reuse_port``: share it with other processes that set SO_REUSEPORT too (the other frontends of
        `slonn serve --frontends N`)."""
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port or None)
        await site.start()
        return self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def _model(self, request: web.Request):
        return self.server.find_model(request.match_info["model"],
                              request.match_info.get("version", ""))

    async def server_metadata(self, request):
        from slonn.scheduler.oip_grpc import _version

        return web.json_response({"name": oip.SERVER_NAME, "version": _version(), "extensions": list(oip.EXTENSIONS)})

    async def live(self, request):
        return web.Response(status=200)

    async def ready(self, request):
        return web.Response(status=200 if self.server.ready() else 503)

    async def model_metadata(self, request):
        return web.json_response(oip.model_metadata(self._model(request)))

    async def model_ready(self, request):
        name = request.match_info["model"]
        if name not in self.server.failed:  # a model that failed to load is known, and not ready
            self._model(request)
        return web.Response(status=200 if self.server.model_ready(name) else 503)

    async def model_config(self, request):
        m = self._model(request)
        return web.json_response({
            "name": m.name, "platform": oip.PLATFORM, "max_batch_size": self.server.sample_limit[0],
            "input": [{"name": oip.INPUT, "data_type": "TYPE_FP32", "dims": [m.arch.in_features]}],
            "output": [{"name": oip.OUTPUT, "data_type": "TYPE_FP32", "dims": [m.arch.out_features]}],
            "dynamic_batching": {}})

    async def infer(self, request: web.Request) -> web.Response:
        started = time.perf_counter_ns()
        srv = self.server
        model, slo_class, samples = request.match_info["model"], "", 0
        try:
            manifest = self._model(request)
            body, binary = _split_body(await request.read(), request.headers.get(HEADER_LENGTH))
            slo_class, budget = oip.read_parameters(_object(body.get("parameters", {}), "parameters"),
                                                    srv.default_class)
            x = _samples(body, binary, manifest, *srv.sample_limit)
            samples = len(x)
            want_binary = _binary_output(body)
            done = await admit_samples(srv.dispatcher, manifest.name, slo_class, x, budget, None, "inputs[0]")
        except RequestError as exc:
            oip.count_error(srv.metrics, srv.known_models, srv.cfg.classes, model, slo_class, exc, max(samples, 1))
            raise
        out = oip.outputs(done)
        params = oip.summary_parameters(done, (time.perf_counter_ns() - started) * 1e-6)
        tensor: dict[str, Any] = {"name": oip.OUTPUT, "datatype": "FP32", "shape": list(out.shape)}
        answer: dict[str, Any] = {"model_name": manifest.name, "model_version": oip.VERSION, "outputs": [tensor],
                                  "parameters": params}
        if "id" in body:
            answer["id"] = body["id"]
        if not want_binary:
            tensor["data"] = out.reshape(-1).tolist()
            return web.json_response(answer)
        raw = out.tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        head = json.dumps(answer).encode()
        return web.Response(body=head + raw, content_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(len(head))})


def _split_body(data: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON header and the binary tensor data after it (binary tensor data extension)."""
    if header_length is None:
        head, binary = data, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidArgument(f"{HEADER_LENGTH}: got {header_length!r}, expected a byte count") from None
        if not 0 <= n <= len(data):
            raise InvalidArgument(f"{HEADER_LENGTH}: {n} is beyond the {len(data)}-byte body")
        head, binary = data[:n], data[n:]
    try:
        body = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"request body: not valid JSON ({exc})") from None
    return _object(body, "request body"), binary


def _object(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field}: expected a JSON object, got {type(value).__name__}")
    return value


def _samples(body: dict, binary: bytes, manifest, max_samples: int, limit: str) -> np.ndarray:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise InvalidArgument(f"inputs: expected a list of one tensor named {oip.INPUT!r} (see the model's "
                              "metadata)")
    t = _object(inputs[0], "inputs[0]")
    if t.get("name") != oip.INPUT:
        raise InvalidArgument(f"inputs[0].name: got {t.get('name')!r}, expected {oip.INPUT!r}")
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidArgument(f"inputs[0].shape: got {shape!r}, expected a list of integers")
    datatype = t.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidArgument(f"inputs[0].datatype: got {datatype!r}, expected a string such as 'FP32'")
    size = _object(t.get("parameters", {}), "inputs[0].parameters").get("binary_data_size")
    raw = None
    if size is not None:
        if not isinstance(size, int) or size != len(binary):
            raise InvalidArgument(f"inputs[0].parameters.binary_data_size: got {size!r}, the body carries "
                                  f"{len(binary)} bytes of binary data")
        raw = binary
    elif "data" not in t:
        raise InvalidArgument("inputs[0].data: missing (or give parameters.binary_data_size)")
    outputs = body.get("outputs") or []
    if not isinstance(outputs, list):
        raise InvalidArgument(f"outputs: expected a list of requested outputs, got {type(outputs).__name__}")
    for i, o in enumerate(outputs):
        if _object(o, f"outputs[{i}]").get("name") != oip.OUTPUT:
            raise InvalidArgument(f"outputs[{i}].name: got {o.get('name')!r}, expected {oip.OUTPUT!r}")
    return oip.decode_samples(manifest, "inputs[0]", datatype, shape, raw, t.get("data"), max_samples,
                              limit)


def _binary_output(body: dict) -> bool:
    """Whether the client asked for the output as binary tensor data."""
    outputs = body.get("outputs") or []
    asked = any(_object(o.get("parameters", {}), "outputs.parameters").get("binary_data") for o in outputs)
    return bool(asked or _object(body.get("parameters", {}), "parameters").get("binary_data_output"))

