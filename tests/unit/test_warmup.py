"""The cold-start warm-up sweep survives one worker death per task (no scheduler exists yet to retry)."""

from __future__ import annotations

import asyncio

import pytest

from slonn.scheduler.latency import warmup_profile
from slonn.workers.contract import InputContract
from slonn.workers.pool import WorkerDied
from tests.fakes import FakeWorkerPool


class DyingOncePool(FakeWorkerPool):
    """Finishes every batch at once, except that the worker dies under the ``die_at``-th submission."""

    def __init__(self, die_at: set[int]) -> None:
        super().__init__(workers=1)
        self.die_at = die_at

    def submit(self, task):
        future = super().submit(task)
        i = len(self.submitted) - 1
        asyncio.get_running_loop().call_soon(
            self.fail if i in self.die_at else self.finish, i, *(
                (WorkerDied("SIGKILL"),) if i in self.die_at else ()))
        return future


class Manifest:
    name = "m"
    levels = (1.0, 0.1)
    contract = InputContract(64, (0.0,) * 64, (16.0,) * 64)

    class arch:
        in_features = 64


async def test_warmup_reruns_a_task_whose_worker_died():
    pool = DyingOncePool(die_at={2})
    rows = await warmup_profile(pool, Manifest, max_batch=2, repeats=1)
    assert len(rows) == 4  # 2 levels x batch sizes {1, 2}: every cell measured despite the death
    assert len(pool.submitted) == 5


async def test_warmup_gives_up_after_the_retry_dies_too():
    pool = DyingOncePool(die_at={0, 1})
    with pytest.raises(WorkerDied):
        await warmup_profile(pool, Manifest, max_batch=2, repeats=1)
