"""The asyncio dispatcher against a FakeWorkerPool: routing, cancellation, faults, expiry, drain."""

from __future__ import annotations

import asyncio
import logging
import random

import numpy as np
import pytest

from slonn.policy.planner import SLOAwarePolicy
from slonn.policy.table import LatencyTable
from slonn.scheduler.clock import FakeClock, MonotonicClock
from slonn.scheduler.config import SLOClassConfig
from slonn.scheduler.core import Scheduler
from slonn.scheduler.dispatcher import Dispatcher
from slonn.scheduler.errors import DeadlineUnreachable, ErrorKind, RequestError, Unavailable
from slonn.scheduler.latency import StaticLatency
from slonn.workers.pool import TaskFailed, WorkerDied
from tests.fakes import FakeWorkerPool, until

LEVELS = (1.0, 0.5, 0.1)
ACC = (0.97, 0.96, 0.95)
CLASSES = {
    "slow": SLOClassConfig("slow", latency_ms=10_000, min_accuracy=0.9, max_queue=1000),
    "tight": SLOClassConfig("tight", latency_ms=10, min_accuracy=0.9),
    "tight-serve": SLOClassConfig("tight-serve", latency_ms=10, min_accuracy=0.9, on_late="serve"),
}


def make(pool: FakeWorkerPool, clock=None, max_inflight: int = 8192, classes=CLASSES) -> Dispatcher:
    table = LatencyTable.constant(LEVELS, 16, per_item_ms=0.1, fixed_ms=1.0)
    scheduler = Scheduler({"m": ACC}, classes, SLOAwarePolicy())
    d = Dispatcher(scheduler, pool, clock or MonotonicClock(), StaticLatency({"m": table}), {"m": ACC},
                   max_batch=16, overhead_ms=0.0, max_inflight=max_inflight)
    d.start()
    return d


def x(i: int) -> np.ndarray:
    return np.full(64, float(i), np.float32)


async def test_outputs_go_back_to_their_own_requests():
    pool = FakeWorkerPool(workers=1)
    d = make(pool)
    first = asyncio.create_task(d.infer("m", "slow", x(100)))
    await until(lambda: len(pool.submitted) == 1, "first batch submitted")
    rest = [asyncio.create_task(d.infer("m", "slow", x(i))) for i in range(5)]
    await until(lambda: d.scheduler.pending() == 5, "five queued behind the busy worker")
    pool.finish(0)
    await until(lambda: len(pool.submitted) == 2, "second batch submitted")
    assert len(pool.submitted[1][0].inputs) == 5  # one batch for all five
    pool.finish(1)
    assert (await first).output[0] == 100
    for i, task in enumerate(rest):
        done = await task
        assert done.output[0] == i and done.batch_size == 5 and done.level in LEVELS


async def test_each_batch_logs_why_at_debug(caplog):
    """Explainability: one debug line per batch with its size, level, prediction, slack, reason."""
    pool = FakeWorkerPool(workers=1)
    d = make(pool)
    with caplog.at_level(logging.DEBUG, logger="slonn.scheduler.dispatcher"):
        task = asyncio.create_task(d.infer("m", "slow", x(7)))
        await until(lambda: len(pool.submitted) == 1, "batch submitted")
    pool.finish(0)
    done = await task
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan m:")]
    assert len(lines) == 1
    assert "1 of 1 candidates" in lines[0] and f"level {done.level:g}" in lines[0] and "slack" in lines[0]


async def test_a_cancelled_caller_leaves_the_queue_and_its_input_is_never_run():
    pool = FakeWorkerPool(workers=1)
    d = make(pool)
    busy = asyncio.create_task(d.infer("m", "slow", x(100)))
    await until(lambda: len(pool.submitted) == 1, "worker busy")
    stay = asyncio.create_task(d.infer("m", "slow", x(1)))
    leave = asyncio.create_task(d.infer("m", "slow", x(2)))
    await until(lambda: d.scheduler.pending() == 2, "two queued")
    leave.cancel()
    await until(lambda: d.scheduler.pending() == 1, "cancelled request gone")
    pool.finish(0)
    await until(lambda: len(pool.submitted) == 2, "next batch")
    assert [row[0] for row in pool.submitted[1][0].inputs] == [1.0]
    pool.finish(1)
    assert (await stay).output[0] == 1 and (await busy).output[0] == 100
    assert d.inflight == 0


async def test_cancelling_a_request_already_in_a_batch_keeps_the_counts_right():
    pool = FakeWorkerPool(workers=1)
    d = make(pool)
    running = asyncio.create_task(d.infer("m", "slow", x(1)))
    await until(lambda: len(pool.submitted) == 1, "running")
    running.cancel()
    await until(lambda: d.inflight == 0, "inflight released")
    pool.finish(0)  # its result arrives after the caller left: dropped, nothing breaks
    assert d.scheduler.pending() == 0
    later = asyncio.create_task(d.infer("m", "slow", x(2)))
    await until(lambda: len(pool.submitted) == 2, "still dispatching")
    pool.finish(1)
    assert (await later).output[0] == 2


@pytest.mark.parametrize(("failures", "kind"), [
    ([TaskFailed("RuntimeError: boom")], ErrorKind.INTERNAL),
    ([WorkerDied("killed"), WorkerDied("killed again")], ErrorKind.UNAVAILABLE),
])
async def test_a_failed_batch_fails_every_request_in_it_with_the_right_status(failures, kind):
    pool = FakeWorkerPool(workers=1)
    d = make(pool)
    first = asyncio.create_task(d.infer("m", "slow", x(0)))
    await until(lambda: len(pool.submitted) == 1, "running")
    batch = [asyncio.create_task(d.infer("m", "slow", x(i))) for i in range(1, 4)]
    await until(lambda: d.scheduler.pending() == 3, "queued")
    pool.finish(0)
    await first
    for n, exc in enumerate(failures, start=1):
        await until(lambda: len(pool.submitted) == n + 1, f"batch of three running, try {n}")
        pool.fail(n, exc)
    for task in batch:
        with pytest.raises(RequestError) as info:
            await task
        assert info.value.kind == kind
    assert d.inflight == 0 and len(pool.submitted) == len(failures) + 1


async def test_a_dead_workers_batch_is_run_once_more_with_the_same_inputs_and_answered():
    pool = FakeWorkerPool(workers=1)
    d = make(pool)
    calls = [asyncio.create_task(d.infer("m", "slow", x(i))) for i in range(3)]
    await until(lambda: len(pool.submitted) == 1, "first batch running")
    first = sorted(row[0] for row in pool.submitted[0][0].inputs)
    pool.fail(0, WorkerDied("SIGKILL"))
    await until(lambda: len(pool.submitted) == 2, "the retry")
    assert sorted(row[0] for row in pool.submitted[1][0].inputs) == first
    sample = d.metrics.registry.get_sample_value
    assert sample("slonn_requests_requeued_total", {"model": "m", "slo_class": "slow"}) == 3
    assert sample("slonn_batches_lost_to_worker_death_total", {"model": "m"}) == 1
    pool.finish(1)
    await until(lambda: len(pool.submitted) == 2 + (d.scheduler.pending() > 0), "the rest, if any")
    if len(pool.submitted) == 3:
        pool.finish(2)
    assert [(await c).output[0] for c in calls] == [0, 1, 2]


async def test_a_retried_request_that_can_no_longer_make_its_deadline_is_expired_not_run_late():
    clock = FakeClock(100.0)
    pool = FakeWorkerPool(workers=1)
    d = make(pool, clock)
    tight = asyncio.create_task(d.infer("m", "tight", x(1)))  # 10 ms deadline, on_late="reject"
    await until(lambda: len(pool.submitted) == 1, "running")
    clock.advance(0.0095)  # the worker dies with 0.5 ms left: no level fits any more
    pool.fail(0, WorkerDied("SIGKILL"))
    with pytest.raises(DeadlineUnreachable):
        await tight
    assert len(pool.submitted) == 1 and d.inflight == 0 and d.scheduler.pending() == 0


def answers(d: Dispatcher, slo_class: str) -> dict[str, float]:
    """slonn_answers_total for model m and ``slo_class``, by result."""
    return {s.labels["result"]: s.value for metric in d.metrics.registry.collect() for s in metric.samples
            if s.name == "slonn_answers_total" and s.labels["slo_class"] == slo_class}


@pytest.mark.parametrize("slo_class", ["tight", "tight-serve"])
async def test_a_batch_finishing_after_the_deadline_is_answered_by_the_class_on_late(slo_class):
    """A pool slower than predicted: in a reject class the late result is DEADLINE_EXCEEDED (counted so),
    never an OK flagged late; in a serve class it is served, flagged late."""
    clock = FakeClock(100.0)
    pool = FakeWorkerPool(workers=1)
    d = make(pool, clock)
    call = asyncio.create_task(d.infer("m", slo_class, x(3)))  # 10 ms deadline; predicted about 1.1 ms
    await until(lambda: len(pool.submitted) == 1, "running")
    clock.advance(0.0125)  # the batch takes 12.5 ms: 2.5 ms past the deadline
    pool.finish(0, exec_ms=12.5)
    if slo_class == "tight":
        with pytest.raises(DeadlineUnreachable, match=r"missed by 2\.5 ms: the 10\.0 ms deadline") as caught:
            await call
        assert caught.value.kind == ErrorKind.DEADLINE_EXCEEDED
        assert answers(d, slo_class) == {"DEADLINE_EXCEEDED": 1.0}
    else:
        done = await call
        assert done.late and done.output[0] == 3
        assert answers(d, slo_class) == {"late": 1.0}
    assert d.inflight == 0


async def test_a_batch_finishing_in_time_in_a_reject_class_is_served_not_late():
    clock = FakeClock(100.0)
    pool = FakeWorkerPool(workers=1)
    d = make(pool, clock)
    call = asyncio.create_task(d.infer("m", "tight", x(4)))
    await until(lambda: len(pool.submitted) == 1, "running")
    clock.advance(0.0099)
    pool.finish(0, exec_ms=9.9)
    done = await call
    assert not done.late and done.output[0] == 4
    assert answers(d, "tight") == {"in_slo": 1.0}


async def one_running_one_queued(pool: FakeWorkerPool, d: Dispatcher) -> tuple[asyncio.Task, asyncio.Task]:
    """The single worker busy with x(0), x(1) queued behind it."""
    running = asyncio.create_task(d.infer("m", "slow", x(0)))
    await until(lambda: len(pool.submitted) == 1, "running")
    queued = asyncio.create_task(d.infer("m", "slow", x(1)))
    await until(lambda: d.scheduler.pending() == 1, "queued")
    return running, queued


async def test_a_pool_that_cannot_start_workers_fails_queued_and_new_requests_unavailable():
    pool = FakeWorkerPool(workers=1)
    d = make(pool)
    busy, queued = await one_running_one_queued(pool, d)
    pool.is_broken = True
    pool.fail(0, WorkerDied("died; its replacement died while starting"))
    for call in (busy, queued):
        with pytest.raises(Unavailable):
            await call
    with pytest.raises(Unavailable):
        await d.infer("m", "slow", x(2))
    assert d.inflight == 0 and d.scheduler.pending() == 0


async def test_a_request_that_turns_hopeless_while_no_worker_is_free_is_answered_early():
    clock = FakeClock(100.0)
    pool = FakeWorkerPool(workers=1)
    d = make(pool, clock)
    busy = asyncio.create_task(d.infer("m", "slow", x(0)))
    await until(lambda: len(pool.submitted) == 1, "worker busy")
    tight = asyncio.create_task(d.infer("m", "tight", x(1)))  # 10 ms deadline
    await until(lambda: d.scheduler.pending() == 1, "queued")
    clock.advance(0.009)  # 1 ms left: less than the fastest level's 1.1 ms
    d._wakeup.set()
    with pytest.raises(DeadlineUnreachable):
        await tight
    assert len(pool.submitted) == 1  # it never ran
    pool.finish(0)
    await busy


async def test_drain_answers_queued_requests_unavailable_and_lets_running_ones_finish():
    pool = FakeWorkerPool(workers=1)
    d = make(pool)
    running, queued = await one_running_one_queued(pool, d)
    drained = asyncio.create_task(d.drain(grace_s=0.0))
    assert await drained == 1
    with pytest.raises(Unavailable):
        await queued
    with pytest.raises(Unavailable):
        await d.infer("m", "slow", x(2))  # no admission after drain began
    pool.finish(0)
    assert (await running).output[0] == 0


async def test_in_flight_cap_rejects_resource_exhausted():
    pool = FakeWorkerPool(workers=1)
    d = make(pool, max_inflight=2)
    a = asyncio.create_task(d.infer("m", "slow", x(0)))
    b = asyncio.create_task(d.infer("m", "slow", x(1)))
    await until(lambda: d.inflight == 2, "two in flight")
    with pytest.raises(RequestError) as info:
        await d.infer("m", "slow", x(2))
    assert info.value.kind == ErrorKind.RESOURCE_EXHAUSTED
    await until(lambda: len(pool.submitted) == 1, "one batch for both")
    pool.finish(0)
    assert [r.output[0] for r in await asyncio.gather(a, b)] == [0, 1]
    assert d.inflight == 0


async def test_every_request_gets_exactly_one_answer_under_random_faults():
    rng = random.Random(7)
    pool = FakeWorkerPool(workers=2)
    d = make(pool)
    tasks = []
    answered = 0
    for i in range(300):
        tasks.append(asyncio.create_task(d.infer("m", "slow", x(i))))
        if rng.random() < 0.1:
            tasks[rng.randrange(len(tasks))].cancel()
        await asyncio.sleep(0)
        # Resolve whatever is running, at random: success, worker death, model error.
        while answered < len(pool.submitted):
            roll = rng.random()
            if roll < 0.8:
                pool.finish(answered)
            elif roll < 0.9:
                pool.fail(answered, WorkerDied("killed"))
            else:
                pool.fail(answered, TaskFailed("boom"))
            answered += 1
            await asyncio.sleep(0)
    while d.scheduler.pending() or answered < len(pool.submitted):
        await until(lambda: answered < len(pool.submitted), "a batch for the queued requests")
        pool.finish(answered)
        answered += 1
    results = await asyncio.gather(*tasks, return_exceptions=True)
    kinds = {type(r).__name__ for r in results}
    assert kinds <= {"Completion", "CancelledError", "Unavailable", "RequestError"}
    assert all(t.done() for t in tasks) and d.inflight == 0
    # A successful answer carries its own input back.
    for i, r in enumerate(results):
        if type(r).__name__ == "Completion":
            assert r.output[0] == i


async def test_a_raised_overhead_allowance_decays_without_batches_so_admission_reopens():
    # Contention raised the learned overhead so far that every "tight" request (10 ms) is refused at
    # admission; with no batch running, nothing would ever lower it again.
    clock = FakeClock(100.0)
    pool = FakeWorkerPool(workers=1)
    d = make(pool, clock)
    d.driver.overhead_ms = 12.0  # as if learned under contention
    clock.advance(1.5)
    d.contexts()
    assert d.overhead_ms == 12.0  # idle, refusing nobody: keeps what it learned
    with pytest.raises(DeadlineUnreachable):
        await d.infer("m", "tight", x(0))
    clock.advance(0.5)
    d.contexts()
    assert d.overhead_ms == 12.0  # not stale yet
    clock.advance(0.6)
    d.contexts()
    assert d.overhead_ms == 6.0
    clock.advance(1.1)
    task = asyncio.create_task(d.infer("m", "tight", x(1)))  # 3 ms + 1.1 ms fits in 10 ms: admitted, run
    await until(lambda: len(pool.submitted) == 1, "admitted and running")
    assert d.overhead_ms == 3.0
    pool.finish(0)
    assert (await task).output.shape == (pool.out_features,)


async def test_a_replacement_worker_coming_up_wakes_the_dispatcher():
    pool = FakeWorkerPool(workers=0)  # the only worker died; its replacement is starting
    d = make(pool)
    call = asyncio.create_task(d.infer("m", "slow", x(7)))  # a serve-late class: no expiry wakes the loop
    await until(lambda: d.scheduler.pending() == 1, "queued")
    pool.workers = 1
    pool.on_idle()  # what ProcessPool calls when the replacement reports ready
    await until(lambda: len(pool.submitted) == 1, "dispatched on the new worker without waiting for a tick")
    pool.finish(0)
    assert (await call).output[0] == 7


async def test_a_worker_dying_after_drain_answers_unavailable_instead_of_requeueing():
    pool = FakeWorkerPool(workers=1)
    d = make(pool)
    running = asyncio.create_task(d.infer("m", "slow", x(1)))
    await until(lambda: len(pool.submitted) == 1, "running")
    assert await d.drain(grace_s=0.0) == 0  # the batch outran the grace period
    pool.fail(0, WorkerDied("killed by close()"))
    with pytest.raises(Unavailable):
        await running
    assert d.scheduler.pending() == 0 and d.inflight == 0


async def test_a_batch_that_cannot_be_launched_is_answered_not_lost(monkeypatch):
    pool = FakeWorkerPool(workers=1)
    broken = {"on": True}
    submit = pool.submit

    def failing_submit(task):
        if broken["on"]:
            raise RuntimeError("the pool refused the batch")
        return submit(task)

    monkeypatch.setattr(pool, "submit", failing_submit)
    d = make(pool)
    with pytest.raises(RequestError, match="internal scheduler error"):
        await asyncio.wait_for(d.infer("m", "slow", x(1)), 5.0)
    broken["on"] = False  # the loop survived: the next request runs
    task = asyncio.create_task(d.infer("m", "slow", x(2)))
    await until(lambda: len(pool.submitted) == 1, "the next batch submitted")
    pool.finish(0)
    assert (await task).output[0] == 2
