"""The simulator and the live Dispatcher are two shells around one Driver: the same arrivals, run through both
(the Dispatcher on a fake clock with a pool of scripted exec times), give the same decisions."""

from __future__ import annotations

import asyncio
import bisect
from dataclasses import dataclass, field, replace
from heapq import heappop, heappush
from typing import Callable

import numpy as np
import pytest

from slonn.policy.factory import make_policy
from slonn.policy.planner import Policy, Wait
from slonn.policy.table import LatencyTable
from slonn.scheduler.clock import FakeClock
from slonn.scheduler.config import SLOClassConfig
from slonn.scheduler.core import Batch, Scheduler
from slonn.scheduler.dispatcher import Completion, Dispatcher
from slonn.scheduler.driver import FRONTEND_BATCH_MS, FRONTEND_REQUEST_MS, Driver
from slonn.scheduler.errors import RequestError
from slonn.scheduler.latency import StaticLatency
from slonn.scheduler.simloop import SimLoop
from slonn.scheduler.simulator import CLIENT_TIMEOUT, ContentionProfile, LatencyDraw, SimConfig, simulate
from slonn.scheduler.trace import Arrivals, poisson_arrivals
from slonn.workers.protocol import BatchTask
from tests.fakes import FakeWorkerPool, WrappedPolicy

LEVELS = (1.0, 0.5, 0.25, 0.1)
ACCURACY = (0.97, 0.965, 0.96, 0.95)
CLASSES = {
    "tight": SLOClassConfig("tight", 4.0, 0.95, 0, 64, "reject"),
    "interactive": SLOClassConfig("interactive", 10.0, 0.95, 0, 24, "reject"),
    "standard": SLOClassConfig("standard", 50.0, 0.96, 1, 256, "reject"),
    "batch": SLOClassConfig("batch", 200.0, 0.97, 2, 1024, "serve"),
}
MIX = {"tight": 0.1, "interactive": 0.4, "standard": 0.3, "batch": 0.2}
MAX_BATCH = 16
# Quiet, then a co-runner makes every batch four times slower (and the planner sees it 20 ms late), then quiet.
CONTENTION = ContentionProfile(0.0, 0.5, 0.12, 0.3)
# The workers' dispatch cost (2 ms) is above the planner's overhead floor (0.5 ms): the driver learns it.
CFG = SimConfig(workers=2, max_batch=MAX_BATCH, overhead_ms=0.5, dispatch_ms=2.0, reply_ms_per_request=0.0,
                signal_lag_s=0.02, max_inflight=100)
WIDTH = 4  # each request's input is its index repeated: a batch's inputs name its requests


def latency_table() -> LatencyTable:
    quiet = LatencyTable.constant(LEVELS, MAX_BATCH, per_item_ms=0.25, fixed_ms=0.5)
    return LatencyTable(LEVELS, MAX_BATCH, (0.25,), np.stack([quiet.safe_ms[0], 4 * quiet.safe_ms[0]]),
                        np.stack([quiet.mean_ms[0], 4 * quiet.mean_ms[0]]))


@dataclass
class Decisions:
    """What a run decided: each batch as (planned at, request ids in order, level, size), and each request's
    answer as (status, answered at, level, batch size)."""

    batches: list[tuple[float, list[int], float, int]] = field(default_factory=list)
    answers: dict[int, tuple[str, float, float, int]] = field(default_factory=dict)
    overhead_ms: float = 0.0


def run_simulator(arrivals: Arrivals, policy: str | Policy, cfg: SimConfig = CFG,
                  frontend: FakeFrontend | None = None) -> Decisions:
    """``frontend``: the driver measures it as the frontend's CPU (the planner may then wait for larger
    batches); the simulator's own frontend model stays off, as the fake costs no time."""
    table = latency_table()
    out = Decisions()

    def launched(batch: Batch) -> None:
        out.batches.append((batch.planned_at_s, [r.handle for r in batch.requests], batch.plan.level,
                            len(batch.requests)))

    scheduler = Scheduler({"m": ACCURACY}, CLASSES, policy if isinstance(policy, Policy) else make_policy(policy))
    draw = LatencyDraw.from_table(table, CONTENTION.states)
    if frontend is None:
        result = simulate(arrivals, CLASSES, scheduler.policy, table, ACCURACY, draw, cfg, CONTENTION, model="m",
                          scheduler=scheduler, on_launch=launched)
        for r in result.records:
            ok = r.status == "OK"
            out.answers[r.index] = (r.status, r.answer_s, r.level if ok else -1.0, r.batch_size if ok else 0)
        return out
    # As simulate() builds its loop, with the fake frontend's CPU in place of the modelled one's.
    driver = Driver(scheduler, {"m": table}, {"m": ACCURACY}, cfg.max_batch, cfg.overhead_ms, cfg.workers,
                    cfg.max_inflight, contention=lambda now: CONTENTION.at(now - cfg.signal_lag_s),
                    frontend_cpu=frontend.cpu_s, frontend_batch_ms=FRONTEND_BATCH_MS,
                    frontend_request_ms=FRONTEND_REQUEST_MS)

    def counted(batch: Batch) -> None:
        frontend.batches += 1
        launched(batch)

    loop = SimLoop(driver, arrivals, {c: CLASSES[c].latency_ms for c in set(arrivals.classes)}, table, draw, cfg,
                   CONTENTION, "m", counted)
    loop.run()
    for k in range(len(arrivals)):
        ok = loop.status[k] == "OK"
        out.answers[k] = (loop.status[k], loop.answer_s[k], loop.out_level[k] if ok else -1.0,
                          loop.out_batch[k] if ok else 0)
    out.overhead_ms = driver.overhead_ms
    return out


class FakeFrontend:
    """A frontend CPU clock both drivers read the same way: ``request_ms`` per request sent by then and
    ``batch_ms`` per batch launched so far (the shell counts them)."""

    def __init__(self, arrivals: Arrivals, request_ms: float, batch_ms: float) -> None:
        self.offsets = arrivals.offsets_s.tolist()
        self.request_s = request_ms * 1e-3
        self.batch_s = batch_ms * 1e-3
        self.batches = 0

    def cpu_s(self, now: float) -> float:
        return self.request_s * bisect.bisect_right(self.offsets, now) + self.batch_s * self.batches


class CountingWaits(WrappedPolicy):
    """slonn's policy, asked first whether to wait (as the real one is), counting the waits."""

    def __init__(self) -> None:
        super().__init__()
        self.may_wait = True
        self.waits = 0

    def wait_until(self, head, count, now_s, ctx):
        until_s = self.inner.wait_until(head, count, now_s, ctx)
        self.waits += until_s is not None
        return until_s

    def plan(self, candidates, now_s, ctx):
        decision = self.inner.plan(candidates, now_s, ctx)
        self.waits += isinstance(decision, Wait)
        return decision


class ScriptedPool(FakeWorkerPool):
    """A fake pool whose batches finish when their scripted time comes: submitted at ``now``, a batch is done
    at ``now + exec_ms + dispatch``, its exec time drawn as the simulator draws it (noise-free table)."""

    def __init__(self, clock: FakeClock, table: LatencyTable, cfg: SimConfig) -> None:
        super().__init__(workers=cfg.workers, out_features=WIDTH)
        self.clock = clock
        self.table = table
        self.draw = LatencyDraw.from_table(table, CONTENTION.states)
        self.dispatch_s = cfg.dispatch_ms * 1e-3
        self.on_submit: Callable[[], None] | None = None
        self.due: list[tuple[float, int, float]] = []
        """(done at, index in submitted, exec ms), a heap: ties go to the batch submitted first."""
        self.planned_at: list[float] = []

    def submit(self, task: BatchTask) -> asyncio.Future:
        future = super().submit(task)
        if self.on_submit is not None:
            self.on_submit()
        now = self.clock.now()
        exec_ms = self.draw(CONTENTION.at(now), self.table.level_index(task.level), len(task.inputs))
        heappush(self.due, (now + exec_ms * 1e-3 + self.dispatch_s, len(self.submitted) - 1, exec_ms))
        self.planned_at.append(now)
        return future

    def next_due_s(self) -> float:
        return self.due[0][0] if self.due else float("inf")

    def finish_next(self) -> None:
        _, i, exec_ms = heappop(self.due)
        self.finish(i, exec_ms)


async def settle() -> None:
    """Let every ready callback run: the infer coroutines, the pool's futures, the dispatcher's loop."""
    for _ in range(25):
        await asyncio.sleep(0)


async def run_dispatcher(arrivals: Arrivals, policy: str | Policy, cfg: SimConfig = CFG,
                         frontend: FakeFrontend | None = None) -> Decisions:
    """The same events in the same order as the simulator: arrivals first on a tie, then finished batches,
    then the dispatcher's own wake-up; client give-ups (the replay's timeout) just before each event."""
    clock = FakeClock(0.0)
    table = latency_table()
    pool = ScriptedPool(clock, table, cfg)
    if frontend is not None:
        pool.on_submit = lambda: setattr(frontend, "batches", frontend.batches + 1)
    d = Dispatcher(Scheduler({"m": ACCURACY}, CLASSES, policy if isinstance(policy, Policy) else make_policy(policy)),
                   pool, clock, StaticLatency({"m": table}), {"m": ACCURACY}, MAX_BATCH, cfg.overhead_ms,
                   cfg.max_inflight, contention=lambda: CONTENTION.at(clock.now() - cfg.signal_lag_s),
                   workers=cfg.workers, frontend_cpu=None if frontend is None else lambda: frontend.cpu_s(clock.now()))
    d.start()
    await settle()
    out = Decisions()
    offsets, classes = arrivals.offsets_s.tolist(), list(arrivals.classes)
    give_up = [t + CLASSES[c].latency_ms * 1e-3 * cfg.timeout_factor + 1.0 for t, c in zip(offsets, classes)]
    give_up_order = sorted(range(len(offsets)), key=give_up.__getitem__)
    tasks: dict[int, asyncio.Task] = {}

    def answered(k: int, task: asyncio.Task) -> None:
        if task.cancelled():
            out.answers[k] = (CLIENT_TIMEOUT, give_up[k], -1.0, 0)
        elif isinstance(task.exception(), RequestError):
            out.answers[k] = (task.exception().kind.value, clock.now(), -1.0, 0)
        else:
            done: Completion = task.result()
            out.answers[k] = ("OK", clock.now(), done.level, done.batch_size)

    i = j = 0
    inf = float("inf")
    while True:
        t_fin = pool.next_due_s()
        t_next = min(t_fin, inf if d.wake_at_s is None else d.wake_at_s)
        t_arr = offsets[i] if i < len(offsets) else inf
        now = t_arr if t_arr < t_next else t_next
        if now == inf:
            break
        while j < len(give_up_order) and give_up[give_up_order[j]] <= now:
            task = tasks.get(give_up_order[j])
            j += 1
            if task is not None and not task.done():
                task.cancel()
        await settle()
        clock.set(now)
        if t_arr <= t_next:
            tasks[i] = asyncio.create_task(d.infer("m", classes[i], np.full(WIDTH, float(i), np.float32)))
            tasks[i].add_done_callback(lambda t, k=i: answered(k, t))
            i += 1
        elif t_fin <= now:
            pool.finish_next()
        else:
            d.wake()
        await settle()
    for (task, _), planned_at in zip(pool.submitted, pool.planned_at):
        out.batches.append((planned_at, [int(row[0]) for row in task.inputs], task.level, len(task.inputs)))
    out.overhead_ms = d.overhead_ms
    await d.drain(0.0)
    return out


@pytest.mark.parametrize("policy", ["slonn", "slonn:recent_tau_ms=60", "triton:max_delay_ms=2"])
async def test_the_simulator_and_the_dispatcher_make_the_same_decisions(policy):
    arrivals = poisson_arrivals(3000.0, 0.45, MIX, seed=11)
    sim = run_simulator(arrivals, policy)
    live = await run_dispatcher(arrivals, policy)
    assert len(live.answers) == len(sim.answers) == len(arrivals)  # every request answered once, in both
    assert live.batches == sim.batches
    assert live.answers == sim.answers
    # The load reaches every path of the loop: batches of many sizes, answers in time and late, the in-flight
    # cap; with slonn's policy also several levels, refusals at admission and the expiry of queued requests.
    statuses = {a[0] for a in sim.answers.values()}
    assert {"OK", "RESOURCE_EXHAUSTED"} <= statuses
    assert len({b[3] for b in sim.batches}) > 5
    if policy.startswith("slonn"):
        send = arrivals.offsets_s
        expired = [k for k, a in sim.answers.items() if a[0] == "DEADLINE_EXCEEDED" and a[1] > send[k]]
        refused = [k for k, a in sim.answers.items() if a[0] == "DEADLINE_EXCEEDED" and a[1] == send[k]]
        assert expired and refused and len({b[2] for b in sim.batches}) > 1
    # The overhead allowance was learned from the batches (the dispatch cost), the same in both.
    assert live.overhead_ms == pytest.approx(CFG.dispatch_ms) and live.overhead_ms > CFG.overhead_ms


async def test_the_comparison_sees_a_change_in_the_loop():
    """A loop that learns its overhead allowance differently decides differently: the comparison above
    would catch it (here the simulator's workers cost 1 ms more per batch than the dispatcher's)."""
    arrivals = poisson_arrivals(3000.0, 0.45, MIX, seed=11)
    sim = run_simulator(arrivals, "slonn", replace(CFG, dispatch_ms=CFG.dispatch_ms + 1.0))
    live = await run_dispatcher(arrivals, "slonn")
    assert [b[1:] for b in live.batches] != [b[1:] for b in sim.batches]


async def test_with_the_frontend_measured_both_make_the_same_decisions_waits_included():
    """The live server always measures its frontend's CPU, and slonn's planner then waits for larger batches
    near saturation: both shells read the same (fake) frontend CPU and decide the same, waits included."""
    arrivals = poisson_arrivals(3000.0, 0.45, MIX, seed=11)
    policies, runs = [], []
    for run in (run_simulator, run_dispatcher):
        policy = CountingWaits()
        result = run(arrivals, policy, CFG, FakeFrontend(arrivals, request_ms=0.2, batch_ms=0.6))
        policies.append(policy)
        runs.append(await result if asyncio.iscoroutine(result) else result)
    sim, live = runs
    assert len(live.answers) == len(sim.answers) == len(arrivals)
    assert live.batches == sim.batches
    assert live.answers == sim.answers
    # Both planners waited. Not necessarily the same number of times: the dispatcher may decide once more
    # on an event that moves nothing (a timer firing as an arrival lands), which answers Wait again.
    assert policies[0].waits > 10 and policies[1].waits > 10
    plain = run_simulator(arrivals, "slonn")
    assert [b[1:] for b in plain.batches] != [b[1:] for b in sim.batches]  # and the waits changed the batches
