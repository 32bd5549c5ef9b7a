"""The Open Inference Protocol, driven by real clients: tritonclient.grpc and tritonclient.http (asyncio).

One module-scoped server speaks slonn.v1 and OIP over gRPC on one port, OIP over HTTP on another, and its
metrics on a third. Tests assert answers, status codes and counters, never timings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import aiohttp
import grpc
import numpy as np
import pytest
import pytest_asyncio
import torch

tritonclient = pytest.importorskip("tritonclient")
import tritonclient.grpc.aio as tgrpc  # noqa: E402
import tritonclient.http.aio as thttp  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from slonn.protos import grpc_service_pb2 as oip_pb  # noqa: E402
from slonn.protos import grpc_service_pb2_grpc as oip_grpc  # noqa: E402
from slonn.scheduler.config import ServerConfig, SLOClassConfig  # noqa: E402
from slonn.workers.artifact import load_artifact  # noqa: E402
from tests.serving import started_server  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "tiny"
FEATURES = 64
MAX_BATCH = 16
CLASSES = {c.name: c for c in (
    SLOClassConfig("interactive", latency_ms=5000, min_accuracy=0.0, priority=0, max_queue=1024, on_late="reject"),
    SLOClassConfig("relaxed", latency_ms=10000, min_accuracy=0.0, priority=1, max_queue=1024, on_late="serve"),
    SLOClassConfig("perfect", latency_ms=5000, min_accuracy=0.9999),
    SLOClassConfig("few", latency_ms=5000, min_accuracy=0.0, max_queue=4),
)}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tiny_model_dir):
    cfg = ServerConfig(model_dirs=(tiny_model_dir,), classes=CLASSES, host="127.0.0.1", port=0, http_port=0,
                       workers=1, max_batch=MAX_BATCH, grace_s=5.0)
    srv = await started_server(cfg)
    srv.test_metrics_port = srv.metrics.serve(0, "127.0.0.1")
    yield srv
    await srv.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gclient(server):
    c = tgrpc.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield c
    await c.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def hclient(server):
    c = thttp.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
    yield c
    await c.close()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Held-out digits the tiny model classifies with a wide margin at every level, and their classes."""
    from slonn.workers.digits import load_split

    model, manifest = load_artifact(tiny_model_dir)
    x = load_split().x_test
    with torch.inference_mode():
        logits = [model(torch.from_numpy(x), level) for level in manifest.levels]
    margins = [(torch.topk(lg, 2, dim=-1).values[:, 0] - torch.topk(lg, 2, dim=-1).values[:, 1]).numpy()
               for lg in logits]
    keep = np.min(margins, axis=0) > 1.0
    return x[keep][:64], logits[0].numpy().argmax(axis=1)[keep][:64], manifest


def grpc_input(x: np.ndarray, datatype: str = "FP32") -> tgrpc.InferInput:
    t = tgrpc.InferInput("input", list(x.shape), datatype)
    t.set_data_from_numpy(x)
    return t


def http_input(x: np.ndarray, datatype: str = "FP32", binary: bool = True) -> thttp.InferInput:
    t = thttp.InferInput("input", list(x.shape), datatype)
    t.set_data_from_numpy(x, binary_data=binary)
    return t


async def grpc_status(coro) -> str:
    with pytest.raises(InferenceServerException) as info:
        await coro
    return info.value


# -- gRPC: health and metadata -----------------------------------------------------------------


async def test_grpc_health_and_metadata(gclient, server):
    assert await gclient.is_server_live()
    assert await gclient.is_server_ready()
    assert await gclient.is_model_ready(MODEL)
    meta = await gclient.get_server_metadata()
    assert meta.name == "slonn" and "binary_tensor_data" in meta.extensions
    model = await gclient.get_model_metadata(MODEL)
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("input", "FP32", [-1, FEATURES])]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [("output", "FP32", [-1, 10])]
    config = (await gclient.get_model_config(MODEL)).config
    assert config.max_batch_size == MAX_BATCH and list(config.input[0].dims) == [FEATURES]


async def test_metadata_carries_the_input_contract_labels_and_levels_over_grpc_and_http(gclient, hclient,
                                                                                        tiny_model_dir):
    from slonn.workers.artifact import load_manifest

    manifest = load_manifest(tiny_model_dir)
    config = (await gclient.get_model_config(MODEL)).config
    over_grpc = {k: json.loads(v.string_value) for k, v in config.parameters.items()}
    over_http = {k: json.loads(v) for k, v in (await hclient.get_model_metadata(MODEL))["parameters"].items()}
    assert over_grpc == over_http
    contract = over_grpc["input_contract"]
    assert contract["features"] == FEATURES and len(contract["min"]) == len(contract["max"]) == FEATURES
    assert contract["preprocessing"] == manifest.contract.preprocessing
    assert over_grpc["labels"] == list(manifest.labels)
    assert over_grpc["levels"] == {f"{lv:g}": manifest.accuracy[lv] for lv in manifest.levels}


async def test_grpc_health_answers_for_the_oip_service_and_each_model(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("inference.GRPCInferenceService", MODEL):
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Check(health_pb2.HealthCheckRequest(service="no-such-model"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("call", ["is_model_ready", "get_model_metadata", "get_model_config"])
async def test_grpc_unknown_model_is_not_found(gclient, call):
    err = await grpc_status(getattr(gclient, call)("no-such-model"))
    assert err.status() == "StatusCode.NOT_FOUND" and "no-such-model" in err.message()


# -- gRPC: infer ----------------------------------------------------------------------------------


async def test_grpc_single_sample_matches_local_model(gclient, reference):
    x, want, manifest = reference
    result = await gclient.infer(MODEL, [grpc_input(x[:1])], request_id="one")
    out = result.as_numpy("output")
    assert out.shape == (1, 10) and out.argmax() == want[0]
    resp = result.get_response()
    assert resp.id == "one" and resp.model_name == MODEL
    params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in resp.parameters.items()}
    assert params["level"] in manifest.levels
    assert params["expected_accuracy"] == manifest.accuracy[params["level"]]
    assert 1 <= params["batch_size"] <= MAX_BATCH and params["exec_ms"] > 0 and params["late"] is False


async def test_grpc_batch_answers_in_input_order(gclient, reference):
    x, want, _ = reference
    result = await gclient.infer(MODEL, [grpc_input(x[:MAX_BATCH])], parameters={"slo_class": "relaxed"})
    out = result.as_numpy("output")
    assert out.shape == (MAX_BATCH, 10)
    np.testing.assert_array_equal(out.argmax(axis=1), want[:MAX_BATCH])


@pytest.mark.parametrize("datatype,cast", [("FP16", np.float16), ("FP64", np.float64), ("INT32", np.int32),
                                            ("UINT8", np.uint8), ("BF16", "bfloat16")])
async def test_grpc_datatypes_convert_to_fp32(gclient, reference, datatype, cast):
    x, want, _ = reference
    if cast == "bfloat16":
        cast = pytest.importorskip("ml_dtypes").bfloat16  # tritonclient's own BF16 type
    # The digits' pixels are whole numbers 0..16: exact in every one of these types.
    result = await gclient.infer(MODEL, [grpc_input(x[:4].astype(cast), datatype)])
    np.testing.assert_array_equal(result.as_numpy("output").argmax(axis=1), want[:4])


async def test_grpc_typed_contents_are_read(server, reference):
    x, want, _ = reference
    request = oip_pb.ModelInferRequest(model_name=MODEL, id="typed")
    t = request.inputs.add(name="input", datatype="FP32", shape=[2, FEATURES])
    t.contents.fp32_contents.extend(x[:2].reshape(-1).tolist())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        resp = await oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    out = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(list(resp.outputs[0].shape))
    np.testing.assert_array_equal(out.argmax(axis=1), want[:2])


def _bad(x):
    """Requests each failing one check, with the status and the words its message must hold."""
    return {
        "shape": ([grpc_input(x[:1, :63])], {}, "INVALID_ARGUMENT", "inputs[0].shape"),
        "too_many_samples": ([grpc_input(x[:MAX_BATCH + 1])], {}, "INVALID_ARGUMENT", "inputs[0].shape"),
        "input_name": ([tgrpc.InferInput("pixels", [1, FEATURES], "FP32").set_data_from_numpy(x[:1])], {},
                       "INVALID_ARGUMENT", "inputs[0].name"),
        "bytes": ([grpc_input(np.array([[b"a"] * FEATURES], dtype=np.object_), "BYTES")], {}, "INVALID_ARGUMENT",
                  "inputs[0].datatype"),
        "inexact_int": ([grpc_input((x[:1] + 2**25).astype(np.int64), "INT64")], {}, "INVALID_ARGUMENT",
                        "2^24"),
        "nan": ([grpc_input(np.full((1, FEATURES), np.nan, np.float32))], {}, "INVALID_ARGUMENT", "NaN"),
        "budget": ([grpc_input(x[:1])], {"latency_budget_ms": -1.0}, "INVALID_ARGUMENT", "latency_budget_ms"),
        "class_type": ([grpc_input(x[:1])], {"slo_class": 3}, "INVALID_ARGUMENT", "parameters.slo_class"),
        "class": ([grpc_input(x[:1])], {"slo_class": "gold"}, "NOT_FOUND", "gold"),
        "floor": ([grpc_input(x[:1])], {"slo_class": "perfect"}, "FAILED_PRECONDITION", "min_accuracy"),
        "unreachable": ([grpc_input(x[:1])], {"latency_budget_ms": 1e-6}, "DEADLINE_EXCEEDED", "cannot be met"),
    }


@pytest.mark.parametrize("case", sorted(_bad(np.zeros((MAX_BATCH + 1, FEATURES), np.float32))))
async def test_grpc_errors_have_slonn_status_codes(gclient, reference, case):
    x, want, _ = reference
    inputs, params, status, words = _bad(np.concatenate([x, x])[:MAX_BATCH + 1])[case]
    err = await grpc_status(gclient.infer(MODEL, inputs, parameters=params or None))
    assert err.status() == f"StatusCode.{status}" and words in err.message()
    result = await gclient.infer(MODEL, [grpc_input(x[:1])])  # and the server goes on
    assert result.as_numpy("output").argmax() == want[0]


@contextlib.contextmanager
def max_inflight(server, n: int):
    """The running server as if started with ``--max-inflight n`` (below MAX_BATCH): its admission cap and the
    sample limit the frontends check; restored after."""
    cfg, cap = server.cfg, server.dispatcher.driver.max_inflight
    server.cfg, server.dispatcher.driver.max_inflight = dataclasses.replace(cfg, max_inflight=n), n
    try:
        yield
    finally:
        server.cfg, server.dispatcher.driver.max_inflight = cfg, cap


async def test_more_samples_than_max_inflight_is_invalid_argument_naming_the_limit(server, gclient, hclient,
                                                                                    reference):
    """N <= --max-batch but > --max-inflight could never be admitted: the request is refused as invalid (a retry
    cannot help), over gRPC and HTTP alike, and ModelConfig's max_batch_size says so."""
    x, want, _ = reference
    with max_inflight(server, 8):
        assert (await gclient.get_model_config(MODEL)).config.max_batch_size == 8
        assert (await hclient.get_model_config(MODEL))["max_batch_size"] == 8
        err = await grpc_status(gclient.infer(MODEL, [grpc_input(x[:12])]))
        assert err.status() == "StatusCode.INVALID_ARGUMENT"
        assert "inputs[0].shape" in err.message() and "max_inflight=8" in err.message()
        with pytest.raises(InferenceServerException) as info:
            await hclient.infer(MODEL, [http_input(x[:12])])
        assert info.value.status() == "400" and "max_inflight=8" in info.value.message()
        result = await gclient.infer(MODEL, [grpc_input(x[:8])])  # within the limit: served
        np.testing.assert_array_equal(result.as_numpy("output").argmax(axis=1), want[:8])


async def test_more_samples_than_the_class_queue_holds_is_invalid_argument_naming_max_queue(gclient, hclient,
                                                                                           reference):
    x, want, _ = reference
    err = await grpc_status(gclient.infer(MODEL, [grpc_input(x[:5])], parameters={"slo_class": "few"}))
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert "inputs[0]: 5 samples" in err.message() and "max_queue=4" in err.message()
    with pytest.raises(InferenceServerException) as info:
        await hclient.infer(MODEL, [http_input(x[:5])], parameters={"slo_class": "few"})
    assert info.value.status() == "400" and "max_queue=4" in info.value.message()
    result = await gclient.infer(MODEL, [grpc_input(x[:4])], parameters={"slo_class": "few"})
    np.testing.assert_array_equal(result.as_numpy("output").argmax(axis=1), want[:4])


async def test_grpc_unknown_model_infer_is_not_found(gclient, reference):
    err = await grpc_status(gclient.infer("no-such-model", [grpc_input(reference[0][:1])]))
    assert err.status() == "StatusCode.NOT_FOUND"


async def test_grpc_stream_answers_every_request(gclient, reference):
    x, want, _ = reference

    async def requests():
        for i in range(4):
            yield {"model_name": MODEL, "inputs": [grpc_input(x[i:i + 1])], "request_id": f"s{i}"}
        yield {"model_name": MODEL, "inputs": [grpc_input(x[:1, :10])], "request_id": "bad"}

    answers, errors = {}, []
    async for result, error in gclient.stream_infer(requests()):
        if error is not None:
            errors.append(str(error))
        else:
            answers[result.get_response().id] = result.as_numpy("output").argmax()
        if len(answers) + len(errors) == 5:
            break
    assert answers == {f"s{i}": want[i] for i in range(4)}
    assert len(errors) == 1 and "inputs[0].shape" in errors[0]


# -- HTTP/REST ----------------------------------------------------------------------------------


async def test_http_health_and_metadata(hclient):
    assert await hclient.is_server_live()
    assert await hclient.is_server_ready()
    assert await hclient.is_model_ready(MODEL)
    assert not await hclient.is_model_ready("no-such-model")
    assert (await hclient.get_server_metadata())["name"] == "slonn"
    meta = await hclient.get_model_metadata(MODEL)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, FEATURES]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
    assert (await hclient.get_model_config(MODEL))["max_batch_size"] == MAX_BATCH


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
async def test_http_batch_answers_in_input_order(hclient, reference, binary):
    x, want, manifest = reference
    out = thttp.InferRequestedOutput("output", binary_data=binary)
    result = await hclient.infer(MODEL, [http_input(x[:8], binary=binary)], outputs=[out], request_id="h1",
                                 parameters={"slo_class": "relaxed", "latency_budget_ms": 4000})
    np.testing.assert_array_equal(result.as_numpy("output").argmax(axis=1), want[:8])
    resp = result.get_response()
    assert resp["id"] == "h1" and resp["parameters"]["level"] in manifest.levels
    assert resp["parameters"]["late"] is False


async def test_http_client_errors_have_status_and_message(hclient, reference):
    x = reference[0]
    cases = [(hclient.infer("no-such-model", [http_input(x[:1])]), "404", "no-such-model"),
             (hclient.infer(MODEL, [http_input(x[:1, :5])]), "400", "inputs[0].shape"),
             (hclient.infer(MODEL, [http_input(x[:1])], parameters={"slo_class": "gold"}), "404", "gold"),
             (hclient.infer(MODEL, [http_input(x[:1])], parameters={"slo_class": "perfect"}), "400", "min_accuracy")]
    for call, status, words in cases:
        with pytest.raises(InferenceServerException) as info:
            await call
        assert info.value.status() == status and words in info.value.message()


async def _post(server, path: str, data: bytes, headers=None, method: str = "POST"):
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"http://127.0.0.1:{server.http_port}{path}", data=data,
                                   headers=headers) as r:
            return r.status, await r.read()


@pytest.mark.parametrize("body,status,words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "request body"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}).encode(),
     400, "inputs[0].shape"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, FEATURES], "datatype": "FP32", "data": [1]}]}).encode(),
     400, "inputs[0].data"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, FEATURES], "datatype": "FP32",
                             "data": [[1, 2], [3]]}]}).encode(), 400, "inputs[0].data"),
    (json.dumps({"inputs": [{"name": "input", "shape": "1x64", "datatype": "FP32", "data": []}]}).encode(),
     400, "inputs[0].shape"),
    (json.dumps({"inputs": []}).encode(), 400, "inputs"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, FEATURES], "datatype": "FP32", "data": [0] * FEATURES}],
                 "outputs": 7}).encode(), 400, "outputs"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, FEATURES], "datatype": "BOOL",
                             "data": [True] * FEATURES}]}).encode(), 400, "inputs[0].datatype"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, FEATURES], "datatype": "FP32", "data": [0] * FEATURES}],
                 "parameters": {"latency_budget_ms": "soon"}}).encode(), 400, "latency_budget_ms"),
])
async def test_http_bad_requests_are_4xx_with_the_oip_error_body(server, body, status, words):
    got, data = await _post(server, f"/v2/models/{MODEL}/infer", body)
    assert got == status
    assert words in json.loads(data)["error"]


async def test_http_unknown_paths_and_models_are_404_and_bad_binary_header_400(server):
    for path, method in (("/v2/models/nope/infer", "POST"), ("/v2/nowhere", "GET"), ("/v2/models/nope", "GET")):
        status, data = await _post(server, path, b"{}", method=method)
        assert status == 404 and "error" in json.loads(data)
    status, data = await _post(server, f"/v2/models/{MODEL}/infer", b"{}", {"Inference-Header-Content-Length": "99"})
    assert status == 400 and "Inference-Header-Content-Length" in json.loads(data)["error"]
    status, _ = await _post(server, f"/v2/models/{MODEL}/infer", b"", method="GET")
    assert status == 405


# -- metrics --------------------------------------------------------------------------------------


async def _metrics(server, path="/metrics"):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{server.test_metrics_port}{path}") as r:
            return r.status, await r.text()


async def test_metrics_count_every_outcome_and_404_elsewhere(server, gclient, reference):
    from prometheus_client.parser import text_string_to_metric_families

    await grpc_status(gclient.infer(MODEL, [grpc_input(reference[0][:1, :3])]))
    await grpc_status(gclient.infer("no-such-model", [grpc_input(reference[0][:1])]))
    await gclient.infer(MODEL, [grpc_input(reference[0][:4])], parameters={"slo_class": "relaxed"})
    status, text = await _metrics(server)
    assert status == 200
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    results = {(s.labels["model"], s.labels["slo_class"], s.labels["result"]): s.value
               for s in samples if s.name == "slonn_answers_total"}
    assert results[(MODEL, "interactive", "INVALID_ARGUMENT")] >= 1
    assert results[("_unknown", "_unknown", "NOT_FOUND")] >= 1
    assert results[(MODEL, "relaxed", "in_slo")] >= 4
    assert any(s.name == "slonn_queue_depth" and s.labels == {"model": MODEL, "slo_class": "relaxed"}
               for s in samples)
    assert any(s.name == "slonn_request_latency_ms_count" and s.labels["slo_class"] == "relaxed" and s.value >= 4
               for s in samples)
    assert (await _metrics(server, "/"))[0] == 404
    assert (await _metrics(server, "/metricsx"))[0] == 404


async def test_dashboard_queries_only_metrics_the_server_exports(server):
    from prometheus_client.parser import text_string_to_metric_families

    from tests.unit.test_dashboard import DASHBOARD, queried_metrics, series_names

    status, text = await _metrics(server)
    missing = queried_metrics(DASHBOARD) - series_names(text_string_to_metric_families(text))
    assert status == 200 and not missing, f"the dashboard queries metrics /metrics lacks: {sorted(missing)}"


async def test_slonn_v1_errors_before_the_dispatcher_are_counted_too(server):
    from slonn.protos import slonn_pb2, slonn_pb2_grpc
    from slonn.protos.tensors import to_tensor

    def count(model, slo_class, result):
        return server.metrics.registry.get_sample_value(
            "slonn_answers_total", {"model": model, "slo_class": slo_class, "result": result}) or 0.0

    before = count(MODEL, "relaxed", "INVALID_ARGUMENT"), count("_unknown", "relaxed", "NOT_FOUND")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = slonn_pb2_grpc.InferenceStub(channel)
        for model, features in ((MODEL, 3), ("no-such-model", FEATURES)):
            request = slonn_pb2.InferRequest(model=model, slo_class="relaxed",
                                             input=to_tensor(np.zeros(features, np.float32)))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Infer(request, timeout=30)
    assert (count(MODEL, "relaxed", "INVALID_ARGUMENT"), count("_unknown", "relaxed", "NOT_FOUND")) == \
        (before[0] + 1, before[1] + 1)


async def test_blocking_clients_work_too(server, reference):
    """tritonclient's blocking clients (grpc, and http over geventhttpclient), run off the server's loop."""
    import asyncio

    import tritonclient.grpc as grpc_sync
    import tritonclient.http as http_sync

    x, want, _ = reference

    def both():
        g = grpc_sync.InferenceServerClient(f"127.0.0.1:{server.port}")
        h = http_sync.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        try:
            gi = grpc_sync.InferInput("input", [3, FEATURES], "FP32")
            gi.set_data_from_numpy(x[:3])
            hi = http_sync.InferInput("input", [3, FEATURES], "FP32")
            hi.set_data_from_numpy(x[:3])
            return (g.is_server_ready(), h.is_server_ready(), g.infer(MODEL, [gi]).as_numpy("output"),
                    h.infer(MODEL, [hi]).as_numpy("output"))
        finally:
            g.close()
            h.close()

    g_ready, h_ready, g_out, h_out = await asyncio.to_thread(both)
    assert g_ready and h_ready
    np.testing.assert_array_equal(g_out.argmax(axis=1), want[:3])
    np.testing.assert_array_equal(h_out.argmax(axis=1), want[:3])
