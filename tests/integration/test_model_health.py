"""A model whose workers cannot load it: the server starts, serves the other models, and says so per model.

Two artifacts: the tiny model, and a copy named "broken" whose weights file is garbage (its manifest reads
fine). gRPC health, OIP ModelReady / ServerReady over gRPC and HTTP, and infer calls over slonn.v1 and OIP.
"""

from __future__ import annotations

import json
import shutil

import aiohttp
import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slonn.protos import grpc_service_pb2 as oip_pb
from slonn.protos import grpc_service_pb2_grpc as oip_grpc
from slonn.protos.client import AsyncSlonnClient
from slonn.scheduler.config import ServerConfig, SLOClassConfig
from tests.serving import started_server, x

pytestmark = pytest.mark.asyncio(loop_scope="module")

GOOD, BROKEN = "tiny", "broken"
CLASSES = {"relaxed": SLOClassConfig("relaxed", latency_ms=10000, min_accuracy=0.0, on_late="serve")}


@pytest.fixture(scope="module")
def broken_model_dir(tiny_model_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("broken") / BROKEN
    shutil.copytree(tiny_model_dir, directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["name"] = BROKEN
    (directory / "manifest.json").write_text(json.dumps(manifest))
    (directory / "weights.safetensors").write_bytes(b"not a safetensors file")
    return directory


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tiny_model_dir, broken_model_dir):
    cfg = ServerConfig(model_dirs=(broken_model_dir, tiny_model_dir), classes=CLASSES, host="127.0.0.1", port=0,
                       http_port=0, workers=1, max_batch=8, grace_s=2.0)
    srv = await started_server(cfg)
    yield srv
    await srv.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def channel(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


async def test_the_server_starts_and_serves_the_model_that_loads(server):
    assert sorted(server.manifests) == [GOOD] and BROKEN in server.failed
    async with AsyncSlonnClient(f"127.0.0.1:{server.port}") as client:
        done = await client.infer(GOOD, "relaxed", x(1), timeout_s=30)
        assert done.output.shape == (10,)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.infer(BROKEN, "relaxed", x(2), timeout_s=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert repr(BROKEN) in info.value.details() and "could not load" in info.value.details()


@pytest.mark.parametrize(("service", "serving"), [(GOOD, True), (BROKEN, False), ("", False),
                                                  ("inference.GRPCInferenceService", True)])
async def test_grpc_health_per_model(channel, service, serving):
    resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                           timeout=10)
    want = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    assert resp.status == want


async def test_oip_grpc_readiness_and_infer(channel):
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    assert (await stub.ModelReady(oip_pb.ModelReadyRequest(name=GOOD), timeout=10)).ready
    assert not (await stub.ModelReady(oip_pb.ModelReadyRequest(name=BROKEN), timeout=10)).ready
    assert not (await stub.ServerReady(oip_pb.ServerReadyRequest(), timeout=10)).ready  # as Triton: all or not
    assert (await stub.ServerLive(oip_pb.ServerLiveRequest(), timeout=10)).live
    tensor = oip_pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 64])
    request = oip_pb.ModelInferRequest(model_name=BROKEN, inputs=[tensor],
                                       raw_input_contents=[x(3)[None, :].tobytes()])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and repr(BROKEN) in info.value.details()
    request.model_name = GOOD
    assert (await stub.ModelInfer(request, timeout=30)).outputs[0].shape == [1, 10]


async def test_oip_http_readiness_and_infer(server):
    base = f"http://127.0.0.1:{server.http_port}/v2"
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": x(4).tolist()}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async def status(path: str) -> int:
            async with http.get(base + path) as r:
                return r.status
        assert await status(f"/models/{GOOD}/ready") == 200
        assert await status(f"/models/{BROKEN}/ready") != 200
        assert await status("/health/ready") != 200
        assert await status("/health/live") == 200
        async with http.post(f"{base}/models/{BROKEN}/infer", json=body) as r:
            assert r.status == 503 and repr(BROKEN) in (await r.json())["error"]
        async with http.post(f"{base}/models/{GOOD}/infer", json=body) as r:
            assert r.status == 200 and np.asarray((await r.json())["outputs"][0]["data"]).shape == (10,)


async def test_grpc_health_follows_the_pool_after_start(server, channel, monkeypatch):
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=GOOD), timeout=60)
    updates = call.__aiter__()
    try:
        assert (await anext(updates)).status == serving
        monkeypatch.setattr(server.pool, "broken", lambda: True)  # no worker left and none can start
        assert (await anext(updates)).status == not_serving
        monkeypatch.undo()  # a worker is back
        assert (await anext(updates)).status == serving
    finally:
        call.cancel()
