"""Multi-sample slonn.v1 requests: an [N, features] input parsed, admitted with one deadline (the dispatcher's
infer_many) and answered in input order with each sample's facts; one-sample answers stay as they were."""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from slonn.protos import slonn_pb2 as pb
from slonn.protos.client import InferResult
from slonn.protos.tensors import TensorError, samples_from_tensor, to_tensor
from slonn.scheduler.errors import InvalidArgument, RequestError
from slonn.scheduler.server import InferenceServicer
from slonn.workers.contract import RangeCheck
from tests.fakes import FakeWorkerPool
from tests.unit.test_dispatcher import CLASSES, make, until
from tests.unit.test_infer_many import WITH_FEW, answers

F = 64
MAX_SAMPLES = 24
"""The fake server's per-request limit (cfg.max_batch); the dispatcher batches at most 16 at a time."""


def rows(n: int, start: int = 0) -> np.ndarray:
    """Row i is all ``start + i`` (the fake pool echoes the first 10 features: outputs say whose they are)."""
    return np.stack([np.full(F, float(start + i), np.float32) for i in range(n)])


def servicer(pool: FakeWorkerPool, classes=CLASSES) -> InferenceServicer:
    d = make(pool, classes=classes)
    server = SimpleNamespace(
        manifests={"m": SimpleNamespace(arch=SimpleNamespace(in_features=F))},
        cfg=SimpleNamespace(max_batch=MAX_SAMPLES, classes=classes),
        sample_limit=(MAX_SAMPLES, "max_batch"),
        range_checks={"m": RangeCheck(SimpleNamespace(low=(0.0,) * F, high=(100.0,) * F))},
        metrics=d.metrics)
    s = InferenceServicer(d, server)
    s._ids = itertools.count()
    return s


def request(x: np.ndarray, request_id: str = "r") -> pb.InferRequest:
    return pb.InferRequest(model="m", slo_class="slow", input=to_tensor(x), request_id=request_id)


async def answer_all(pool: FakeWorkerPool, task: asyncio.Task):
    """Finish every batch the dispatcher submits until ``task`` is done."""
    finished = 0
    while not task.done():
        await until(lambda: len(pool.submitted) > finished or task.done(), "a batch or the answer")
        while finished < len(pool.submitted):
            pool.finish(finished, exec_ms=1.0 + finished)
            finished += 1
    return await task


# -- parsing -----------------------------------------------------------------


def test_n_samples_decode_to_rows_in_order():
    x = rows(8)
    got = samples_from_tensor(to_tensor(x), "input", F, 16)
    assert got.shape == (8, F) and got.dtype == np.float32
    np.testing.assert_array_equal(got, x)


def test_one_sample_of_shape_f_decodes_to_one_row():
    assert samples_from_tensor(to_tensor(rows(1)[0]), "input", F, 16).shape == (1, F)


def test_wrong_feature_count_names_the_field_and_the_expected_count():
    with pytest.raises(TensorError, match=r"^input\.shape: got \[8, 63\]: 63 features, the model takes 64") as info:
        samples_from_tensor(to_tensor(np.zeros((8, F - 1), np.float32)), "input", F, 16)
    assert "[N, 64] with 1 <= N <= 16" in str(info.value)


def test_more_samples_than_the_limit_names_the_field_and_the_limit():
    with pytest.raises(TensorError, match=r"^input\.shape: got \[17, 64\], 17 samples, at most 16 per request "
                                          r"\(max_inflight=16\)"):
        samples_from_tensor(to_tensor(rows(17)), "input", F, 16, "max_inflight")


@pytest.mark.parametrize("shape", [[2, 2, F], [0, F]])
def test_other_shapes_are_refused_naming_the_field(shape):
    t = pb.Tensor(shape=shape, dtype=pb.FLOAT32, data=b"\0" * (4 * int(np.prod(shape))))
    with pytest.raises(TensorError, match=r"^input\.shape: "):
        samples_from_tensor(t, "input", F, 16)


def test_byte_count_is_checked_for_all_samples():
    t = pb.Tensor(shape=[8, F], dtype=pb.FLOAT32, data=rows(7).tobytes())
    with pytest.raises(TensorError, match=rf"^input\.data: {7 * F * 4} bytes .*expected {8 * F * 4}"):
        samples_from_tensor(t, "input", F, 16)


def test_a_bad_value_in_any_sample_is_refused():
    x = rows(8)
    x[5, 3] = np.nan
    with pytest.raises(TensorError, match=r"^input\.data: .*NaN"):
        samples_from_tensor(to_tensor(x), "input", F, 16)


# -- the servicer: admission and the answer ------------------------------------


async def test_n_samples_are_answered_in_input_order_with_each_samples_facts():
    pool = FakeWorkerPool(workers=1)
    s = servicer(pool)
    x = rows(20, start=1)  # more than one batch (the dispatcher's max_batch is 16)
    x[3, 7] = 1000.0  # far out of the range [0, 100]: flagged on sample 3 only
    resp = await answer_all(pool, asyncio.create_task(s._answer(request(x, "many"), None)))
    assert resp.request_id == "many"
    out = np.frombuffer(resp.output.data, "<f4").reshape(tuple(resp.output.shape))
    assert out.shape == (20, 10)
    assert list(out[:, 0]) == list(range(1, 21))  # each sample's own output, in input order
    assert len(resp.samples) == 20
    sizes = [p.batch_size for p in resp.samples]
    assert len(pool.submitted) >= 2  # 20 samples never fit one batch of 16
    # Each sample's facts come from its own batch (the fake's exec_ms tells the batches apart).
    per_batch = {i: len(task.inputs) for i, (task, _) in enumerate(pool.submitted)}
    for p in resp.samples:
        assert p.batch_size == per_batch[int(p.exec_ms - 1.0)]
        assert p.level in (1.0, 0.5, 0.1) and p.kernel == "fake" and not p.late
    assert [p.out_of_range_features for p in resp.samples] == [0, 0, 0, 1] + [0] * 16
    # The scalar fields: the worst case over the samples.
    assert resp.exec_ms == max(p.exec_ms for p in resp.samples)
    assert resp.batch_size == max(sizes)
    assert resp.level == min(p.level for p in resp.samples)
    assert resp.out_of_range_features == 1
    assert resp.server_ms >= 0
    result = InferResult.from_proto(resp)
    assert result.output.shape == (20, 10)
    assert [r.exec_ms for r in result.samples] == [p.exec_ms for p in resp.samples]


@pytest.mark.parametrize("shape", [[F], [1, F]])
async def test_one_sample_answer_is_unchanged(shape):
    pool = FakeWorkerPool(workers=1)
    s = servicer(pool)
    resp = await answer_all(pool, asyncio.create_task(s._answer(request(rows(1, 5).reshape(shape)), None)))
    assert len(resp.samples) == 0  # no per-sample list for one sample
    assert list(resp.output.shape) == ([10] if len(shape) == 1 else [1, 10])
    assert resp.batch_size == 1 and resp.exec_ms == 1.0
    result = InferResult.from_proto(resp)
    assert len(result.samples) == 1  # the client lists the one sample's facts all the same
    assert (result.samples[0].exec_ms, result.samples[0].batch_size) == (resp.exec_ms, resp.batch_size)


@pytest.mark.parametrize("x, needle", [
    (np.zeros((8, F - 1), np.float32), "the model takes 64"),
    (rows(MAX_SAMPLES + 1), f"at most {MAX_SAMPLES} per request (max_batch={MAX_SAMPLES})"),
])
async def test_shape_errors_are_invalid_argument_naming_the_field(x, needle):
    pool = FakeWorkerPool(workers=1)
    s = servicer(pool)
    with pytest.raises(InvalidArgument, match=r"^input\.shape: ") as info:
        await s._answer(request(x), None)
    assert needle in str(info.value)
    assert not pool.submitted and s.dispatcher.inflight == 0


async def test_more_samples_than_the_class_queue_holds_is_invalid_argument_counted_once_per_sample():
    pool = FakeWorkerPool(workers=1)
    s = servicer(pool, WITH_FEW)
    req = request(rows(7))
    req.slo_class = "few"
    with pytest.raises(InvalidArgument, match=r"^input: 7 samples, .*\(max_queue=6\)"):
        await s._answer(req, None)
    assert answers(s.dispatcher, "INVALID_ARGUMENT") == 7
    assert not pool.submitted and s.dispatcher.inflight == 0


async def test_one_failed_sample_fails_the_call_and_counts_every_sample():
    pool = FakeWorkerPool(workers=1)
    s = servicer(pool)
    task = asyncio.create_task(s._answer(request(rows(8)), None))
    await until(lambda: pool.submitted, "a batch")
    pool.fail(0, RuntimeError("boom"))
    with pytest.raises(RequestError, match="boom"):
        await task
    await until(lambda: s.dispatcher.scheduler.pending() == 0, "siblings left the queue")
    assert s.dispatcher.inflight == 0
    assert answers(s.dispatcher, "INTERNAL") == 8


async def test_a_stream_answers_a_multi_sample_request_with_one_message():
    pool = FakeWorkerPool(workers=1)
    s = servicer(pool)

    async def requests():
        yield request(rows(8, 10), "eight")
        yield request(rows(1, 50)[0], "one")

    async def collect():
        return [a async for a in s.InferStream(requests(), None)]

    answers = await answer_all(pool, asyncio.create_task(collect()))
    by_id = {a.response.request_id: a.response for a in answers}
    assert sorted(by_id) == ["eight", "one"]
    eight = np.frombuffer(by_id["eight"].output.data, "<f4").reshape(8, 10)
    assert list(eight[:, 0]) == list(range(10, 18)) and len(by_id["eight"].samples) == 8
    assert len(by_id["one"].samples) == 0


def test_the_sample_limit_is_the_max_batch_or_max_inflight_when_that_is_smaller():
    from slonn.scheduler.server import SlonnServer

    assert SlonnServer(SimpleNamespace(max_batch=64, max_inflight=8192)).sample_limit == (64, "max_batch")
    assert SlonnServer(SimpleNamespace(max_batch=64, max_inflight=32)).sample_limit == (32, "max_inflight")
