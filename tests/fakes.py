"""Fakes that subclass the real interfaces (after Ray Serve's test fakes)."""

from __future__ import annotations

import asyncio

import numpy as np

from slonn.policy.planner import Policy, SLOAwarePolicy
from slonn.workers.pool import TaskFailed, WorkerDied, WorkerPool
from slonn.workers.protocol import BatchResult, BatchTask


class FakeWorkerPool(WorkerPool):
    """A pool whose batches finish when the test says so.

    ``submitted`` holds (task, future) pairs in order; ``finish(i)`` completes
    one with outputs = inputs[:, :out_features] (so tests can check routing),
    ``fail(i, exc)`` raises in it. ``workers`` sets how many run at once.
    """

    def __init__(self, workers: int = 1, out_features: int = 10) -> None:
        self.workers = workers
        self.out_features = out_features
        self.manifests = {}
        self.failed = {}
        self.submitted: list[tuple[BatchTask, asyncio.Future]] = []
        self._busy = 0
        self.is_broken = False

    async def start(self) -> None:
        pass

    def idle_count(self) -> int:
        return 0 if self.is_broken else self.workers - self._busy

    def submit(self, task: BatchTask) -> asyncio.Future:
        if self._busy >= self.workers:
            raise RuntimeError("submit() with no idle worker")
        self._busy += 1
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(self._release)
        self.submitted.append((task, future))
        return future

    def broken(self) -> bool:
        return self.is_broken and self._busy == 0

    def _release(self, _future: asyncio.Future) -> None:
        self._busy -= 1

    def finish(self, i: int, exec_ms: float = 1.0) -> None:
        task, future = self.submitted[i]
        outputs = np.asarray(task.inputs)[:, : self.out_features].astype(np.float32)
        future.set_result(BatchResult(task.task_id, 0, outputs, exec_ms, "fake"))

    def fail(self, i: int, exc: Exception) -> None:
        self.submitted[i][1].set_exception(exc)

    async def close(self) -> None:
        for _, future in self.submitted:
            if not future.done():
                future.set_exception(WorkerDied("pool closed"))


__all__ = ["FakeWorkerPool", "TaskFailed", "WorkerDied"]


class WrappedPolicy(Policy):
    """A real policy (slonn's by default) behind a wrapper whose methods a test overrides (composition:
    compiled, the policy classes cannot be subclassed from Python; the ``Policy`` base can). The wrapper
    does not say it may wait (``may_wait``), so the scheduler pops the candidates and asks ``plan``."""

    def __init__(self, inner: Policy | None = None) -> None:
        self.inner = inner or SLOAwarePolicy()
        super().__init__(self.inner.name)

    def order_key(self, p):
        return self.inner.order_key(p)

    def is_hopeless(self, p, now_s, ctx):
        return self.inner.is_hopeless(p, now_s, ctx)

    def hopeless_at(self, p, ctx):
        return self.inner.hopeless_at(p, ctx)

    def plan(self, candidates, now_s, ctx):
        return self.inner.plan(candidates, now_s, ctx)

    def observe(self, plan, exec_ms, deadline_met, finished_s):
        self.inner.observe(plan, exec_ms, deadline_met, finished_s)


async def until(predicate, what: str) -> None:
    """Let the loop run until ``predicate()`` holds (bounded: a hang fails the test, not the suite)."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")
