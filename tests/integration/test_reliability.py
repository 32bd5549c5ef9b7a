"""Reliability with real processes: worker kills, overload, early-closed streams, shutdown drain, fuzzing.

Every test checks the same invariant: each request sent ends with exactly one
terminal answer (a result or one of the expected status codes), nothing hangs,
and the server keeps serving. No timing assertions.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slonn.protos import slonn_pb2 as pb
from slonn.protos import slonn_pb2_grpc as pb_grpc
from slonn.protos.client import AsyncSlonnClient, make_request
from slonn.scheduler.config import ServerConfig, SLOClassConfig
from slonn.scheduler.server import SlonnServer
from slonn.scheduler.serverproc import ServerProcess
from tests.serving import outcome, x

MODEL = "tiny"
CLASSES = {c.name: c for c in (
    SLOClassConfig("roomy", latency_ms=20_000, max_queue=4096, on_late="serve"),
    SLOClassConfig("small", latency_ms=20_000, max_queue=4),
)}
TERMINAL = {"OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}


async def settled(server: SlonnServer) -> None:
    """Wait (bounded) until nothing is queued or in flight, then assert it."""
    for _ in range(2000):
        if server.dispatcher.inflight == 0 and server.dispatcher.scheduler.pending() == 0:
            break
        await asyncio.sleep(0.005)
    assert server.dispatcher.inflight == 0 and server.dispatcher.scheduler.pending() == 0


async def start(model_dir: Path, workers: int = 2) -> SlonnServer:
    # max_pending at gRPC's own default (1000): the tests below must see only our statuses; the server
    # still runs with the option set.
    cfg = ServerConfig(model_dirs=(model_dir,), classes=CLASSES, host="127.0.0.1", port=0, workers=workers,
                       max_batch=16, grace_s=5.0, max_pending=1000)
    srv = SlonnServer(cfg)
    await srv.start()
    return srv


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tiny_model_dir):
    srv = await start(tiny_model_dir)
    yield srv
    await srv.stop()


@pytest.mark.asyncio(loop_scope="module")
async def test_killed_workers_are_replaced_and_every_request_is_answered(server, client):
    statuses: Counter = Counter()
    for wave in range(4):
        calls = [asyncio.create_task(outcome(client.infer(MODEL, "roomy", x(i), timeout_s=60)))
                 for i in range(wave * 100, wave * 100 + 100)]
        await asyncio.sleep(0)
        victim = server.pool.pids()[wave % 2]
        os.kill(victim, signal.SIGKILL)  # mid-load: some batch is likely running on it
        statuses.update(await asyncio.gather(*calls))
    assert sum(statuses.values()) == 400
    assert set(statuses) <= {"OK", "UNAVAILABLE"}, statuses
    assert statuses["OK"] > 0
    assert server.pool.restarts >= 4
    # Still serving, on replacement workers.
    assert await outcome(client.infer(MODEL, "roomy", x(999), timeout_s=60)) == "OK"


@pytest.mark.asyncio(loop_scope="module")
async def test_overload_gets_fast_terminal_answers_and_the_server_stays_up(server, client):
    calls = [outcome(client.infer(MODEL, "small", x(i), timeout_s=60)) for i in range(400)]
    statuses = Counter(await asyncio.gather(*calls))
    assert sum(statuses.values()) == 400
    assert set(statuses) <= {"OK", "RESOURCE_EXHAUSTED"}, statuses
    assert server.dispatcher.inflight == 0 and server.dispatcher.scheduler.pending() == 0
    assert await outcome(client.infer(MODEL, "small", x(1000), timeout_s=60)) == "OK"


@pytest.mark.asyncio(loop_scope="module")
async def test_short_grpc_deadlines_on_a_late_serving_class_end_the_calls_and_leave_no_work(server, client):
    # "roomy" serves late answers, but nobody reads them after the call's own deadline: each call ends
    # OK or DEADLINE_EXCEEDED, and whatever was not served leaves the queues instead of waiting its turn.
    calls = [outcome(client.infer(MODEL, "roomy", x(i), timeout_s=0.02)) for i in range(300)]
    statuses = Counter(await asyncio.gather(*calls))
    assert sum(statuses.values()) == 300
    assert set(statuses) <= {"OK", "DEADLINE_EXCEEDED"}, statuses
    await settled(server)
    assert await outcome(client.infer(MODEL, "roomy", x(5), timeout_s=60)) == "OK"


@pytest.mark.asyncio(loop_scope="module")
async def test_a_message_over_the_size_limit_is_refused_and_the_server_stays_up(server, client):
    huge = pb.InferRequest(model=MODEL, slo_class="roomy",
                           input=pb.Tensor(shape=[64], dtype=pb.FLOAT32, data=b"\0" * (server.max_message_bytes + 1)))
    # A channel that itself allows any size, so that the server's limit is what refuses it.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}",
                                         options=[("grpc.max_send_message_length", -1)]) as channel:
        assert await outcome(pb_grpc.InferenceStub(channel).Infer(huge, timeout=60)) == "RESOURCE_EXHAUSTED"
    assert await outcome(client.infer(MODEL, "roomy", x(3), timeout_s=60)) == "OK"


@pytest.mark.asyncio(loop_scope="module")
async def test_a_stream_closed_early_leaves_nothing_behind(server, client):
    async def requests():
        for i in range(50):
            yield make_request(MODEL, "roomy", x(i), request_id=str(i))

    call = client.stub.InferStream(requests())
    first = await call.read()
    assert first.WhichOneof("result") in ("response", "error")
    call.cancel()
    # The server cancels the stream's pending requests; nothing stays queued or in flight.
    await settled(server)
    assert await outcome(client.infer(MODEL, "roomy", x(1), timeout_s=60)) == "OK"


@pytest.mark.asyncio(loop_scope="module")
async def test_shutdown_drains_and_answers_everything(tiny_model_dir):
    srv = await start(tiny_model_dir, workers=1)
    async with AsyncSlonnClient(f"127.0.0.1:{srv.port}") as c:
        await c.wait_ready(30.0)
        calls = [asyncio.create_task(outcome(c.infer(MODEL, "roomy", x(i), timeout_s=60))) for i in range(300)]
        await asyncio.sleep(0.05)
        await srv.stop()
        statuses = Counter(await asyncio.gather(*calls))
    assert sum(statuses.values()) == 300
    assert set(statuses) <= {"OK", "UNAVAILABLE"}, statuses


# ---------------------------------------------------------------- fuzzing a real `slonn serve` process

@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    log, classes = tmp / "serve.log", tmp / "classes.toml"
    classes.write_text('[[class]]\nname = "roomy"\nlatency_ms = 20000\non_late = "serve"\n')
    with ServerProcess(["--model-dir", str(tiny_model_dir), "--workers", "1", "--classes", str(classes)], log) as srv:
        channel = grpc.insecure_channel(srv.target)
        yield pb_grpc.InferenceStub(channel)
        channel.close()
    assert srv.returncode == 0, log.read_text()[-2000:]  # SIGTERM -> drained -> exit 0


floats = st.one_of(st.floats(width=32), st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e38]))


@st.composite
def tensors(draw) -> pb.Tensor:
    kind = draw(st.sampled_from(["valid", "samples", "values", "bytes"]))
    if kind == "valid":  # a third of the time: exercise the OK path too
        values = draw(st.lists(st.floats(0, 16, width=32), min_size=64, max_size=64))
        return pb.Tensor(shape=draw(st.sampled_from([[64], [1, 64]])), dtype=pb.FLOAT32,
                         data=np.asarray(values, np.float32).tobytes())
    if kind == "samples":  # N samples in one request: valid up to the max batch
        n = draw(st.sampled_from([2, 8, 64, 65]))
        return pb.Tensor(shape=[n, 64], dtype=pb.FLOAT32, data=np.full((n, 64), 3.0, "<f4").tobytes())
    shape = draw(st.lists(st.integers(min_value=-3, max_value=1 << 40), max_size=4)
                 | st.sampled_from([[64], [1, 64], [0], [64, 1], [8, 8]]))
    dtype = draw(st.integers(min_value=0, max_value=3))
    if kind == "values":
        n = draw(st.sampled_from([0, 1, 63, 64, 65, 128]))
        data = np.asarray(draw(st.lists(floats, min_size=n, max_size=n)), np.float32).tobytes()
    else:
        data = draw(st.binary(max_size=600))
    return pb.Tensor(shape=shape, dtype=dtype, data=data)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tensor=tensors(), model=st.sampled_from([MODEL, "", "nope"]),
       slo_class=st.sampled_from(["roomy", "", "nope"]), budget=st.sampled_from([0.0, -1.0, 1e-6, float("nan")]))
def test_fuzzed_requests_get_the_right_status_and_the_server_survives(served, tensor, model, slo_class, budget):
    request = pb.InferRequest(model=model, slo_class=slo_class, input=tensor, latency_budget_ms=budget)
    shape = list(tensor.shape)
    n = shape[0] if len(shape) == 2 else 1  # [64], or [N, 64] with N up to the max batch (64 by default)
    valid_tensor = ((shape == [64] or (len(shape) == 2 and shape[1] == 64 and 1 <= n <= 64))
                    and tensor.dtype == pb.FLOAT32 and len(tensor.data) == 256 * n
                    and np.isfinite(np.frombuffer(tensor.data, "<f4")).all())
    response = None
    try:
        response = served.Infer(request, timeout=30)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
    if model != MODEL or slo_class not in ("roomy",):
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    elif not valid_tensor or not budget >= 0:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    else:
        assert code == grpc.StatusCode.OK
        # The class serves late answers: a 1 ns budget is answered, flagged late.
        assert response.late == (budget == 1e-6)
        assert list(response.output.shape) == ([10] if len(shape) == 1 else [n, 10])
    # Alive after every one of them.
    good = make_request(MODEL, "roomy", x(0))
    assert served.Infer(good, timeout=30).batch_size >= 1
