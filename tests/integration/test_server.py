"""The real server: SlonnServer + a spawned worker process + real gRPC calls on 127.0.0.1:0.

One module-scoped server keeps the suite fast (start = worker spawn, kernel
calibration, warm-up profile). Tests assert answers and status codes, never timings.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import grpc
import numpy as np
import pytest
import pytest_asyncio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slonn.protos import slonn_pb2 as pb
from slonn.protos.client import InferResult, make_request
from slonn.protos.tensors import to_tensor
from slonn.scheduler.config import ServerConfig, SLOClassConfig
from slonn.workers.artifact import load_artifact
from slonn.workers.kernels_chooser import split_choice
from tests.serving import assert_matches_reference, started_server

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "tiny"
FEATURES = 64
MAX_BATCH = 16
# Generous deadlines: the suite runs on a busy 2-core machine and must not flake on timing.
CLASSES = {c.name: c for c in (
    SLOClassConfig("interactive", latency_ms=5000, min_accuracy=0.0, priority=0, max_queue=1024, on_late="reject"),
    SLOClassConfig("relaxed", latency_ms=10000, min_accuracy=0.0, priority=1, max_queue=1024, on_late="serve",
                   mode="accuracy"),
    # No level of the tiny model is this accurate: requests of this class are FAILED_PRECONDITION.
    SLOClassConfig("perfect", latency_ms=5000, min_accuracy=0.9999),
)}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tiny_model_dir):
    cfg = ServerConfig(model_dirs=(tiny_model_dir,), classes=CLASSES, host="127.0.0.1", port=0, workers=1,
                       max_batch=MAX_BATCH, grace_s=5.0)
    srv = await started_server(cfg)
    yield srv
    await srv.stop()


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    """The same artifact loaded here: the oracle for the server's answers."""
    return load_artifact(tiny_model_dir)


@pytest.fixture(scope="module")
def samples(local) -> np.ndarray:
    """Held-out digits whose top-2 logit margin is wide at every level.

    The server may run a half-precision kernel; with a wide margin its argmax must
    still equal the fp32 reference's, so the comparison below is deterministic.
    """
    from slonn.workers.digits import load_split

    model, manifest = local
    x = load_split().x_test
    with torch.inference_mode():
        margins = []
        for level in manifest.levels:
            top2 = torch.topk(model(torch.from_numpy(x), level), 2, dim=-1).values
            margins.append((top2[:, 0] - top2[:, 1]).numpy())
    wide = x[np.min(margins, axis=0) > 1.0]
    assert len(wide) >= 128, "the tiny model should be confident on most held-out digits"
    return wide[:128]


def check_answer(result: InferResult, x: np.ndarray, local) -> None:
    """The server's answer equals the local model's at the level the server reports."""
    model, manifest = local
    assert result.level in manifest.levels
    assert result.expected_accuracy == manifest.accuracy[result.level]
    assert 1 <= result.batch_size <= MAX_BATCH
    assert result.exec_ms > 0
    assert result.queue_ms >= 0
    # The handler's time holds the queue wait and the batch's exec (plus admission and IPC).
    assert result.server_ms >= result.queue_ms + result.exec_ms
    assert result.predicted_ms > 0
    assert result.kernel
    # "kernel@level": the worker ran a more accurate level, measured faster at this batch size.
    kernel, run_level = split_choice(result.kernel, result.level)
    assert manifest.accuracy[run_level] >= manifest.accuracy[result.level]
    with torch.inference_mode():
        want = model(torch.from_numpy(x.reshape(1, FEATURES)), keep=run_level).numpy()
    got = result.output.reshape(1, -1)
    assert got.shape == want.shape == (1, manifest.arch.out_features)
    assert got.argmax() == want.argmax()
    assert_matches_reference(got, want, kernel)


async def assert_still_serving(client, samples, local) -> None:
    result = await client.infer(MODEL, "interactive", samples[0], request_id="after-error")
    assert result.request_id == "after-error"
    check_answer(result, samples[0], local)


# -- answers ---------------------------------------------------------------


async def test_unary_infer_matches_local_model(client, samples, local):
    for i, x in enumerate(samples[:8]):
        result = await client.infer(MODEL, "interactive", x, request_id=f"unary-{i}")
        assert result.request_id == f"unary-{i}"
        assert result.output.shape == (local[1].arch.out_features,)  # [F] in, [classes] out
        assert not result.late
        check_answer(result, x, local)


async def test_one_by_f_input_gets_one_by_classes_output(client, samples, local):
    result = await client.infer(MODEL, "interactive", samples[1].reshape(1, FEATURES))
    assert result.output.shape == (1, local[1].arch.out_features)
    check_answer(result, samples[1], local)


async def test_server_assigns_distinct_request_ids_when_empty(client, samples):
    a = await client.infer(MODEL, "interactive", samples[0])
    b = await client.infer(MODEL, "interactive", samples[0])
    assert a.request_id and b.request_id and a.request_id != b.request_id


async def test_concurrent_requests_are_batched_and_correct(client, samples, local):
    xs = samples  # 128 at once: the worker is busy while most of them arrive
    results = await asyncio.gather(*(client.infer(MODEL, "interactive", x, request_id=f"c{i}")
                                     for i, x in enumerate(xs)))
    for i, (x, result) in enumerate(zip(xs, results)):
        assert result.request_id == f"c{i}"
        check_answer(result, x, local)
    assert max(r.batch_size for r in results) > 1
    # Requests of one batch share its level, exec time and size: each group is whole batches.
    groups = Counter((r.level, r.exec_ms, r.batch_size) for r in results)
    for (_, _, size), count in groups.items():
        assert count % size == 0, f"{count} answers claim a batch of {size}"


async def test_late_answer_of_a_serve_class_is_flagged(client, samples, local):
    result = await client.infer(MODEL, "relaxed", samples[2], latency_budget_ms=0.001)
    assert result.late
    check_answer(result, samples[2], local)


async def test_grpc_deadline_is_accepted_when_it_can_be_met(client, samples, local):
    result = await client.infer(MODEL, "interactive", samples[3], timeout_s=30.0)
    check_answer(result, samples[3], local)


# -- streaming -------------------------------------------------------------


async def test_stream_answers_every_request_once_with_errors_in_stream(client, samples, local):
    n = 48
    requests = [make_request(MODEL, "interactive" if i % 2 else "relaxed", samples[i], request_id=f"s{i}")
                for i in range(n)]
    bad_shape = pb.InferRequest(model=MODEL, slo_class="interactive", request_id="bad-shape",
                                input=to_tensor(np.zeros(FEATURES - 1, np.float32)))
    bad_class = make_request(MODEL, "no-such-class", samples[0], request_id="bad-class")
    requests[10:10] = [bad_shape]
    requests[30:30] = [bad_class]

    async def send():
        for r in requests:
            yield r

    answers = [a async for a in client.infer_stream(send())]
    ids = [a.response.request_id if a.HasField("response") else a.error.request_id for a in answers]
    assert Counter(ids) == Counter(r.request_id for r in requests)  # exactly one answer each
    by_id = dict(zip(ids, answers))
    assert by_id["bad-shape"].WhichOneof("result") == "error"
    assert by_id["bad-shape"].error.code == "INVALID_ARGUMENT"
    assert "input.shape" in by_id["bad-shape"].error.message
    assert by_id["bad-class"].error.code == "NOT_FOUND"
    assert "no-such-class" in by_id["bad-class"].error.message
    for i in range(n):
        answer = by_id[f"s{i}"]
        assert answer.WhichOneof("result") == "response", answer
        check_answer(InferResult.from_proto(answer.response), samples[i], local)


async def test_stream_assigns_ids_to_requests_without_one(client, samples):
    async def send():
        for i in range(4):
            yield make_request(MODEL, "interactive", samples[i])

    answers = [a async for a in client.infer_stream(send())]
    ids = {a.response.request_id for a in answers}
    assert len(answers) == 4 and len(ids) == 4 and "" not in ids


async def test_empty_stream_ends_cleanly(client):
    async def send():
        return
        yield  # pragma: no cover

    assert [a async for a in client.infer_stream(send())] == []


# -- multi-sample requests ([N, features]: one deadline, answers in input order) ------------------


def check_many(result: InferResult, xs: np.ndarray, local) -> None:
    """Each sample's answer equals the local model's at the level the server reports for it."""
    assert result.output.shape == (len(xs), local[1].arch.out_features)
    assert len(result.samples) == len(xs)
    for x, out, facts in zip(xs, result.output, result.samples):
        one = InferResult(out, result.request_id, facts.level, facts.expected_accuracy, facts.queue_ms,
                          facts.exec_ms, facts.predicted_ms, facts.batch_size, facts.late, facts.kernel,
                          result.server_ms)
        check_answer(one, x, local)
    # The call's own fields: the worst case over its samples.
    assert result.level == min(s.level for s in result.samples)
    assert result.exec_ms == max(s.exec_ms for s in result.samples)
    assert result.batch_size == max(s.batch_size for s in result.samples)


async def test_unary_call_of_eight_samples_is_answered_in_input_order(client, samples, local):
    xs = samples[8:16]
    result = await client.infer_many(MODEL, "interactive", xs, request_id="eight", timeout_s=30.0)
    assert result.request_id == "eight"
    check_many(result, xs, local)


async def test_stream_calls_of_eight_samples_are_answered_in_input_order(client, samples, local):
    groups = {f"m{g}": samples[8 * g:8 * g + 8] for g in range(4)}

    async def send():
        for rid, xs in groups.items():
            yield make_request(MODEL, "interactive", xs, request_id=rid)
        yield make_request(MODEL, "interactive", samples[40], request_id="single")

    answers = [a async for a in client.infer_stream(send())]
    assert all(a.WhichOneof("result") == "response" for a in answers), answers
    by_id = {a.response.request_id: InferResult.from_proto(a.response) for a in answers}
    assert sorted(by_id) == sorted([*groups, "single"])  # one answer per call, not per sample
    for rid, xs in groups.items():
        check_many(by_id[rid], xs, local)
    check_answer(by_id["single"], samples[40], local)


@pytest.mark.parametrize("shape, needle", [
    ([8, FEATURES - 1], f"{FEATURES - 1} features, the model takes {FEATURES}"),
    ([MAX_BATCH + 1, FEATURES], f"at most {MAX_BATCH} per request (max_batch={MAX_BATCH})"),
])
async def test_multi_sample_shape_errors_name_the_field_and_the_limit(client, samples, local, shape, needle):
    request = make_request(MODEL, "interactive", np.ones(shape, np.float32))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.stub.Infer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input.shape" in info.value.details() and needle in info.value.details()
    await assert_still_serving(client, samples, local)


async def test_a_multi_sample_call_past_its_deadline_fails_as_a_whole(client, samples, local):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.infer_many(MODEL, "interactive", samples[:8], latency_budget_ms=0.001, timeout_s=30.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await assert_still_serving(client, samples, local)


async def test_slonn_infer_sends_a_batch_of_held_out_digits(server, capsys):
    import json

    from slonn.scripts.infer import main as infer_main
    from slonn.workers.digits import load_split

    argv = ["--target", f"127.0.0.1:{server.port}", "--model", MODEL, "--slo-class", "interactive",
            "--index", "5", "--count", "8", "--timeout-s", "30"]
    assert await asyncio.to_thread(infer_main, argv) == 0  # a blocking client: off this loop, which serves
    got = json.loads(capsys.readouterr().out)
    assert [s["label"] for s in got["samples"]] == [int(y) for y in load_split().y_test[5:13]]
    assert all(s["level"] > 0 and s["batch_size"] >= 1 for s in got["samples"])


# -- metadata --------------------------------------------------------------


async def test_list_models_lists_levels_accuracies_and_classes(client, local):
    _, manifest = local
    resp = await client.list_models()
    assert [m.name for m in resp.models] == [MODEL]
    info = resp.models[0]
    assert list(info.input_shape) == [FEATURES]
    assert list(info.output_shape) == [manifest.arch.out_features]
    assert list(info.hidden) == list(manifest.arch.hidden)
    assert [(lv.level, lv.accuracy) for lv in info.levels] == [(lv, manifest.accuracy[lv]) for lv in manifest.levels]
    classes = {c.name: c for c in resp.slo_classes}
    assert set(classes) == set(CLASSES)
    for name, cfg in CLASSES.items():
        c = classes[name]
        assert (c.latency_ms, c.min_accuracy, c.priority, c.max_queue, c.on_late, c.mode) == (
            cfg.latency_ms, cfg.min_accuracy, cfg.priority, cfg.max_queue, cfg.on_late, cfg.mode)


async def test_learner_child_is_up_before_the_server_takes_traffic(server):
    # start() returned (the port is bound): each learner's fitting process already runs, so its
    # start-up (scikit-learn imports) does not compete with the first requests.
    for learner in server.latency.learners.values():
        assert learner.child_pid is not None and learner.child_pid != os.getpid()
        os.kill(learner.child_pid, 0)  # raises if there is no such process


@pytest.mark.parametrize("service", ["", "slonn.v1.Inference"])
async def test_health_reports_serving(client, service):
    stub = health_pb2_grpc.HealthStub(client.channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_lists_the_services_and_gives_their_descriptors(client, version):
    """grpcurl and other reflection clients, on either version of the protocol."""
    if version == "v1":
        from slonn.protos import grpc_reflection_v1_pb2 as rpb
        from slonn.protos import grpc_reflection_v1_pb2_grpc as rgrpc
    else:
        from grpc_reflection.v1alpha import reflection_pb2 as rpb
        from grpc_reflection.v1alpha import reflection_pb2_grpc as rgrpc
    from google.protobuf import descriptor_pb2

    stub = rgrpc.ServerReflectionStub(client.channel)
    requests = [rpb.ServerReflectionRequest(list_services=""),
                rpb.ServerReflectionRequest(file_containing_symbol="slonn.v1.Inference")]
    listed, found = [r async for r in stub.ServerReflectionInfo(iter(requests), timeout=10)]
    names = {s.name for s in listed.list_services_response.service}
    assert {"slonn.v1.Inference", "inference.GRPCInferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in found.file_descriptor_response.file_descriptor_proto]
    assert any(f.package == "slonn.v1" and [s.name for s in f.service] == ["Inference"] for f in files)


# -- errors: each one a status naming the field, and the server keeps serving --------------------


def _tensor(shape, data: bytes, dtype=pb.FLOAT32) -> pb.Tensor:
    return pb.Tensor(shape=shape, dtype=dtype, data=data)


def _with_value(value: float) -> pb.Tensor:
    x = np.ones(FEATURES, np.float32)
    x[5] = value
    return to_tensor(x)


GOOD = np.ones(FEATURES, "<f4").tobytes()
BAD_INPUTS = {
    "wrong-shape": (_tensor([FEATURES - 1], GOOD[:-4]), "input.shape"),
    "two-samples-short": (_tensor([2, FEATURES], GOOD), "input.data"),
    "three-dims": (_tensor([1, 1, FEATURES], GOOD), "input.shape"),
    "wrong-dtype": (_tensor([FEATURES], GOOD, dtype=pb.DATA_TYPE_UNSPECIFIED), "input.dtype"),
    "wrong-byte-count": (_tensor([FEATURES], GOOD + b"\0\0\0\0"), "input.data"),
    "short-data": (_tensor([FEATURES], GOOD[:-1]), "input.data"),
    "nan": (_with_value(float("nan")), "input.data"),
    "inf": (_with_value(float("inf")), "input.data"),
    "minus-inf": (_with_value(float("-inf")), "input.data"),
    "empty-tensor": (_tensor([0], b""), "input.shape"),
    "no-shape": (_tensor([], GOOD), "input.shape"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
async def test_bad_tensor_is_invalid_argument_naming_the_field(client, samples, local, case):
    tensor, field = BAD_INPUTS[case]
    request = pb.InferRequest(model=MODEL, slo_class="interactive", input=tensor, request_id=case)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.stub.Infer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()
    await assert_still_serving(client, samples, local)


REQUEST_ERRORS = {
    "missing-input": (dict(model=MODEL, slo_class="interactive"), grpc.StatusCode.INVALID_ARGUMENT, "input"),
    "missing-model": (dict(slo_class="interactive"), grpc.StatusCode.INVALID_ARGUMENT, "model"),
    "missing-class": (dict(model=MODEL), grpc.StatusCode.INVALID_ARGUMENT, "slo_class"),
    "unknown-model": (dict(model="no-such-model", slo_class="interactive"), grpc.StatusCode.NOT_FOUND,
                      "no-such-model"),
    "unknown-class": (dict(model=MODEL, slo_class="no-such-class"), grpc.StatusCode.NOT_FOUND, "no-such-class"),
    "negative-budget": (dict(model=MODEL, slo_class="interactive", latency_budget_ms=-1.0),
                        grpc.StatusCode.INVALID_ARGUMENT, "latency_budget_ms"),
    "nan-budget": (dict(model=MODEL, slo_class="interactive", latency_budget_ms=float("nan")),
                   grpc.StatusCode.INVALID_ARGUMENT, "latency_budget_ms"),
    "inf-budget": (dict(model=MODEL, slo_class="interactive", latency_budget_ms=float("inf")),
                   grpc.StatusCode.INVALID_ARGUMENT, "latency_budget_ms"),
    "floor-above-model": (dict(model=MODEL, slo_class="perfect"), grpc.StatusCode.FAILED_PRECONDITION,
                          "min_accuracy"),
    "impossible-budget": (dict(model=MODEL, slo_class="interactive", latency_budget_ms=0.001),
                          grpc.StatusCode.DEADLINE_EXCEEDED, "latency budget"),
}


@pytest.mark.parametrize("case", sorted(REQUEST_ERRORS))
async def test_request_error_status(client, samples, local, case):
    fields, code, needle = REQUEST_ERRORS[case]
    if case != "missing-input":
        fields = {**fields, "input": to_tensor(samples[0])}
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.stub.Infer(pb.InferRequest(**fields), timeout=30)
    assert info.value.code() == code, info.value.details()
    assert needle in info.value.details()
    await assert_still_serving(client, samples, local)
