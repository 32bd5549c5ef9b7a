"""Dispatcher.infer_many: N samples, one arrival and deadline, answers in input order, one failure for all."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from slonn.scheduler.config import SLOClassConfig
from slonn.scheduler.errors import InvalidArgument, QueueFull, RequestError
from tests.fakes import FakeWorkerPool
from tests.unit.test_dispatcher import CLASSES, make, until

FEW = SLOClassConfig("few", latency_ms=10_000, min_accuracy=0.9, max_queue=4,
                     overrides=(("m", SLOClassConfig("few", latency_ms=10_000, min_accuracy=0.9, max_queue=6)),))
"""A class whose queue holds 4 requests, 6 for model "m" (the dispatcher's one model)."""
WITH_FEW = {**CLASSES, "few": FEW}


def rows(n: int, start: int = 0) -> np.ndarray:
    return np.stack([np.full(64, float(start + i), np.float32) for i in range(n)])


def answers(d, result: str) -> float:
    return sum(s.value for m in d.metrics.registry.collect() for s in m.samples
               if s.name == "slonn_answers_total" and s.labels["result"] == result)


async def test_samples_share_one_deadline_and_come_back_in_input_order():
    pool = FakeWorkerPool(workers=1)
    d = make(pool)
    task = asyncio.create_task(d.infer_many("m", "slow", rows(20)))
    await until(lambda: len(pool.submitted) == 1, "first batch submitted")
    queued = [r for q in d.scheduler._queues["m"].values() for r in q]
    assert len({r.pending.deadline_s for r in queued}) <= 1  # the rest wait with the batch's one deadline
    pool.finish(0)
    await until(lambda: len(pool.submitted) == 2, "second batch submitted")
    pool.finish(1)
    done = await task
    assert [c.output[0] for c in done] == list(range(20))  # max_batch 16: two batches, input order kept
    assert d.inflight == 0 and answers(d, "in_slo") == 20


async def test_one_failure_answers_the_whole_request_and_frees_the_queue():
    pool = FakeWorkerPool(workers=1)
    d = make(pool)
    task = asyncio.create_task(d.infer_many("m", "slow", rows(20)))
    await until(lambda: len(pool.submitted) == 1, "first batch submitted")
    pool.fail(0, RuntimeError("boom"))
    with pytest.raises(RequestError, match="boom"):
        await task
    await until(lambda: d.scheduler.pending() == 0, "siblings left the queue")
    assert d.inflight == 0
    assert answers(d, "INTERNAL") == 20  # every sample counted once


async def test_admission_failure_takes_back_the_admitted_siblings():
    pool = FakeWorkerPool(workers=1)
    d = make(pool, max_inflight=8)
    with pytest.raises(QueueFull, match="carries 9 samples") as info:
        await d.infer_many("m", "slow", rows(9))
    assert info.value.counted  # a frontend does not count it again
    assert d.scheduler.pending() == 0 and d.inflight == 0
    assert answers(d, "RESOURCE_EXHAUSTED") == 9


async def test_caller_leaving_cancels_every_queued_sample():
    pool = FakeWorkerPool(workers=1)
    d = make(pool)
    task = asyncio.create_task(d.infer_many("m", "slow", rows(20)))
    await until(lambda: len(pool.submitted) == 1, "first batch submitted")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert d.scheduler.pending() == 0 and d.inflight == 0


async def test_more_samples_than_the_class_queue_holds_is_invalid_argument_naming_the_limit():
    pool = FakeWorkerPool(workers=1)
    d = make(pool, classes=WITH_FEW)
    with pytest.raises(InvalidArgument, match=r"^input: 7 samples, .*'few'.*\(max_queue=6\)") as info:
        await d.infer_many("m", "few", rows(7))  # the model's override (6) applies, not the class's 4
    assert info.value.counted and answers(d, "INVALID_ARGUMENT") == 7
    assert d.scheduler.pending() == 0 and d.inflight == 0 and not pool.submitted
    with pytest.raises(InvalidArgument, match=r"^inputs\[0\]: 7 samples"):
        await d.infer_many("m", "few", rows(7), field="inputs[0]")
    task = asyncio.create_task(d.infer_many("m", "few", rows(6)))  # as many as the queue holds: admitted
    await until(lambda: pool.submitted, "a batch")
    pool.finish(0)
    assert [c.output[0] for c in await task] == list(range(6))


async def test_a_full_queue_refuses_the_whole_call_counting_every_sample():
    pool = FakeWorkerPool(workers=1)
    d = make(pool, classes=WITH_FEW)
    first = asyncio.create_task(d.infer("m", "few", rows(1)[0]))
    await until(lambda: pool.submitted, "the worker busy")
    queued = asyncio.create_task(d.infer_many("m", "few", rows(5, start=1)))
    await until(lambda: d.scheduler.pending() == 5, "five queued behind the busy worker")
    with pytest.raises(QueueFull, match="max_queue=6") as info:
        await d.infer_many("m", "few", rows(4))  # one slot left: none of the four is admitted
    assert info.value.counted and answers(d, "RESOURCE_EXHAUSTED") == 4
    assert d.scheduler.pending() == 5 and d.inflight == 6
    pool.finish(0)
    await until(lambda: len(pool.submitted) == 2, "the queued five in one batch")
    pool.finish(1)
    assert (await first).output[0] == 0
    assert [c.output[0] for c in await queued] == [1, 2, 3, 4, 5]
    assert d.inflight == 0 and answers(d, "in_slo") == 6
