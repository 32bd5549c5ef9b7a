"""Workers on two nodes, one three times slower: each batch is planned with its worker's node's table,
contention and overhead allowance; admission judges by the fastest node and the capacity of both; each node
has its own latency learner, seeded from its start-up kernel table."""

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
import pytest

from slonn.policy.latency_model import LatencySample
from slonn.policy.learner import OnlineLearner
from slonn.policy.planner import Plan, SLOAwarePolicy
from slonn.policy.table import LatencyTable
from slonn.scheduler.clock import FakeClock
from slonn.scheduler.config import SLOClassConfig
from slonn.scheduler.core import Batch, Scheduler
from slonn.scheduler.dispatcher import Dispatcher
from slonn.scheduler.driver import OVERHEAD_REFIT_EVERY, Driver, full_batch_ms
from slonn.scheduler.latency import LearnedLatency, NodeLearners, StaticLatency, kernel_ms, node_rows
from slonn.workers.pool import WorkerPool
from slonn.workers.protocol import BatchResult
from tests.fakes import until

LEVELS = (1.0, 0.5, 0.1)
ACC = (0.97, 0.96, 0.95)
MAX_BATCH = 16
FAST = LatencyTable.constant(LEVELS, MAX_BATCH, per_item_ms=0.1, fixed_ms=1.0)
SLOW = LatencyTable.constant(LEVELS, MAX_BATCH, per_item_ms=0.3, fixed_ms=3.0)  # 3x FAST in every cell
TABLES = {("m", "fast"): FAST, ("m", "slow"): SLOW}
CLASSES = {
    "tight": SLOClassConfig("tight", latency_ms=4.0, min_accuracy=0.9, max_queue=1000),
    "roomy": SLOClassConfig("roomy", latency_ms=10_000, min_accuracy=0.9, max_queue=1000, on_late="serve"),
}


def driver(contention: dict[str, float] | None = None) -> Driver:
    scheduler = Scheduler({"m": ACC}, CLASSES, SLOAwarePolicy())
    d = Driver(scheduler, {"m": FAST}, {"m": ACC}, MAX_BATCH, overhead_ms=0.0, workers=2,
               node_tables=lambda model, node: TABLES[(model, node)],
               node_contention=lambda node, _now: (contention or {}).get(node, 0.0))
    d.set_nodes({"fast": 1, "slow": 1})
    return d


def test_a_batch_for_the_slow_node_runs_a_faster_level_than_the_same_batch_on_the_fast_node():
    batches = {}
    for node in ("fast", "slow"):
        d = driver()
        for k in range(16):
            d.admit("m", "tight", 0.0, handle=k)
        (batch,) = d.next_batches(1, 0.0, [node]).batches
        batches[node] = batch
    # Deadline 4 ms: 16 at the most accurate level fit on the fast node (2.6 ms); on the slow one only at 0.1.
    assert batches["fast"].node == "fast" and batches["slow"].node == "slow"
    assert len(batches["fast"].requests) == len(batches["slow"].requests) == 16
    assert batches["fast"].plan.level == 1.0 and batches["slow"].plan.level == 0.1
    assert batches["slow"].plan.predicted_ms == SLOW.safe(0, 2, 16)


def test_the_slow_node_gets_a_smaller_batch_when_no_level_fits_it_whole():
    batches = {}
    for node in ("fast", "slow"):
        d = driver()
        for k in range(16):
            d.admit("m", "tight", 0.0, handle=k)
        (batches[node],) = d.next_batches(1, 0.0008, [node]).batches  # 3.2 ms left
    assert len(batches["fast"].requests) == 16 and batches["fast"].plan.level == 1.0
    # On the slow node even level 0.1 fits only 6 (3 + 0.03 x 6 = 3.18 ms): the rest wait for the next worker.
    assert len(batches["slow"].requests) == 6 and batches["slow"].plan.level == 0.1
    assert not batches["slow"].plan.late


def test_the_most_urgent_batch_goes_to_the_fastest_idle_node():
    d = driver()
    for k in range(32):
        d.admit("m", "tight", 0.0, handle=k)
    out = d.next_batches(2, 0.0, ["slow", "fast"])  # the pool lists the slow node's worker first
    assert [b.node for b in out.batches] == ["fast", "slow"]
    assert [r.handle for r in out.batches[0].requests] == list(range(16))


def test_contention_is_read_per_node():
    busy = LatencyTable(LEVELS, MAX_BATCH, (0.5,), np.stack([FAST.safe_ms[0], 10 * FAST.safe_ms[0]]),
                        np.stack([FAST.mean_ms[0], 10 * FAST.mean_ms[0]]))
    TABLES[("m", "busy")] = busy
    try:
        d = driver({"busy": 2.0})
        d.set_nodes({"fast": 1, "busy": 1})
        assert d.node_contexts("busy", 0.0)["m"].bucket == 1 and d.node_contexts("fast", 0.0)["m"].bucket == 0
    finally:
        del TABLES[("m", "busy")]


def test_admission_judges_by_the_fastest_node_with_the_capacity_of_both():
    d = driver()
    ctx = d.contexts(0.0)["m"]
    assert ctx.table is FAST
    fast, slow = d.node_contexts("fast", 0.0)["m"], d.node_contexts("slow", 0.0)["m"]
    # One fast worker plus a slow one that clears a third as many full batches in the same time.
    assert ctx.workers == pytest.approx(1 + full_batch_ms(fast) / full_batch_ms(slow))
    assert ctx.workers == pytest.approx(1 + 1.16 / 3.48)
    d.set_nodes({"fast": 2, "slow": 1})
    assert d.contexts(0.001)["m"].workers == pytest.approx(2 + 1.16 / 3.48)


def test_a_request_only_the_fast_node_can_serve_in_time_is_not_expired_for_the_slow_one():
    d = driver()
    req = d.admit("m", "tight", 0.0, budget_ms=2.0)  # alone: 1.01 ms on the fast node, 3.03 ms on the slow
    out = d.next_batches(0, 0.0005, [])  # both busy: judged by the fast node
    assert out.expired == [] and d.scheduler.pending() == 1
    assert out.wake_at_s == pytest.approx(req.pending.deadline_s - FAST.mean(0, 2, 1) * 1e-3)


def test_each_node_learns_its_own_overhead_allowance():
    d = driver()
    plan = Plan(1, 1.0, 1.0)
    for node, overhead_ms in (("fast", 0.5), ("slow", 5.0)):
        for i in range(OVERHEAD_REFIT_EVERY):
            batch = Batch("m", [], plan, i * 0.1)
            batch.node = node
            d.on_batch_done(batch, 1.0, i * 0.1 + (1.0 + overhead_ms) * 1e-3)
    allowances = d.node_overhead_ms()
    assert allowances["fast"] == pytest.approx(0.5) and allowances["slow"] == pytest.approx(5.0)
    assert d.node_contexts("slow", 10.0)["m"].overhead_ms == pytest.approx(5.0)
    assert d.node_contexts("fast", 10.0)["m"].overhead_ms == pytest.approx(0.5)


def test_every_node_is_planned_with_the_one_frontends_cost():
    cpu = {"s": 0.0}
    scheduler = Scheduler({"m": ACC}, CLASSES, SLOAwarePolicy())
    d = Driver(scheduler, {"m": FAST}, {"m": ACC}, MAX_BATCH, overhead_ms=0.0, workers=2,
               frontend_cpu=lambda _now: cpu["s"], frontend_batch_ms=0.5, frontend_request_ms=0.5,
               node_tables=lambda model, node: TABLES[(model, node)])
    d.set_nodes({"fast": 1, "slow": 1})
    for k in range(50):
        d.admit("m", "roomy", k * 0.002, handle=k)
    cpu["s"] = 0.05
    judged = d.contexts(0.2)["m"]
    assert judged.arrival_per_s > 0 and judged.frontend_request_ms > 0
    for node in ("fast", "slow"):
        ctx = d.node_contexts(node, 0.2)["m"]
        assert (ctx.arrival_per_s, ctx.frontend_batch_ms, ctx.frontend_request_ms) == \
            (judged.arrival_per_s, judged.frontend_batch_ms, judged.frontend_request_ms)


def test_without_nodes_the_driver_plans_for_one_machine_as_before():
    scheduler = Scheduler({"m": ACC}, CLASSES, SLOAwarePolicy())
    d = Driver(scheduler, {"m": FAST}, {"m": ACC}, MAX_BATCH, overhead_ms=0.0, workers=2)
    for k in range(16):
        d.admit("m", "tight", 0.0, handle=k)
    (batch,) = d.next_batches(1, 0.0, ["slow"]).batches  # nodes are ignored until set_nodes
    assert batch.node == "" and batch.plan.level == 1.0 and d.contexts(0.0)["m"].workers == 2


def test_with_every_node_gone_the_driver_plans_for_one_machine_again():
    """set_nodes({}) after per-node planning: admission and planning use the pool's table, contention and
    workers again, not the contexts judged for the nodes (the fastest node's, their capacity as workers)."""
    slow_busy = LatencyTable(LEVELS, MAX_BATCH, (0.5,), np.stack([SLOW.safe_ms[0], 10 * SLOW.safe_ms[0]]),
                             np.stack([SLOW.mean_ms[0], 10 * SLOW.mean_ms[0]]))
    scheduler = Scheduler({"m": ACC}, CLASSES, SLOAwarePolicy())
    d = Driver(scheduler, {"m": slow_busy}, {"m": ACC}, MAX_BATCH, overhead_ms=0.0, workers=2, contention=2.0,
               node_tables=lambda model, node: slow_busy if node == "slow" else FAST,
               node_contention=lambda node, _now: 0.0)
    one_machine = d.contexts(0.0)["m"]
    assert (one_machine.table, one_machine.bucket, one_machine.workers) == (slow_busy, 1, 2)
    d.set_nodes({"slow": 3})  # one node, on the same table object as the pool's, without its contention
    judged = d.contexts(0.001)["m"]
    assert (judged.table, judged.bucket, judged.workers) == (slow_busy, 0, 3)
    d.set_nodes({})
    again = d.contexts(0.002)["m"]
    assert (again.table, again.bucket, again.workers) == (slow_busy, 1, 2)


# -- the learners -----------------------------------------------------------------------------------


def sample(ms: float = 1.0) -> LatencySample:
    return LatencySample(1.0, 1, 0.0, ms)


def test_samples_from_a_node_train_only_that_nodes_learner():
    pooled, a, b = (OnlineLearner([], LEVELS, MAX_BATCH) for _ in range(3))
    latency = LearnedLatency({"m": pooled})
    latency.add_node("a", {"m": a})
    latency.add_node("b", {"m": b})
    latency.observe("m", sample(), "a")
    latency.observe("m", sample(), "a")
    latency.observe("m", sample(), "b")
    latency.observe("m", sample(), "c")  # a node without learners of its own yet: the model's
    latency.observe("m", sample())
    assert (a.pending, b.pending, pooled.pending) == (2, 1, 2)
    assert latency.table("m", "a") is a.table and latency.table("m", "b") is b.table
    assert latency.table("m", "c") is pooled.table and latency.table("m") is pooled.table
    assert latency.nodes() == ["a", "b"]


def kernel_table(scale: float) -> dict:
    """A start-up kernel table (KernelChooser.to_json()) measured on a node ``scale`` times slower."""
    sizes = (1, 4, 16)
    table = {str(b): {"1.0": "dense", "0.5": "dense@1.0", "0.1": "gather"} for b in sizes}
    timings = {str(b): {"1.0": {"dense": scale * (0.5 + 0.1 * b)}, "0.5": {"dense": 99.0},
                        "0.1": {"gather": scale * (0.2 + 0.02 * b), "dense": 99.0}} for b in sizes}
    return {"measured": True, "levels": list(LEVELS), "table": table, "timings_ms": timings}


def test_kernel_ms_reads_the_chosen_kernel_at_the_next_measured_batch_size():
    t = kernel_table(1.0)
    assert kernel_ms(t, 1, 1.0) == pytest.approx(0.6)
    assert kernel_ms(t, 3, 0.5) == pytest.approx(0.9)  # batch 4's choice: the dense model at 1.0
    assert kernel_ms(t, 64, 0.1) == pytest.approx(0.52)  # beyond the last size: the largest
    assert kernel_ms({}, 1, 1.0) is None


def test_a_nodes_kernel_table_seeds_its_latency_model():
    rng = np.random.default_rng(0)
    rows = [LatencySample(level, b, 0.0, (0.4 + 0.05 * b * level) * rng.uniform(0.95, 1.05))
            for level in LEVELS for b in (1, 2, 4, 8, 16) for _ in range(4)]
    here, slow = kernel_table(1.0), kernel_table(2.0)
    seeded = node_rows(rows, slow, [here])
    assert [s.exec_ms for s in seeded] == pytest.approx([2.0 * s.exec_ms for s in rows])
    assert node_rows(rows, here, [here]) == rows
    # Measured elsewhere: the nodes' median per cell stands for the machine the rows come from.
    assert [s.exec_ms for s in node_rows(rows, slow, [here, slow, slow])] == pytest.approx([s.exec_ms for s in rows])
    base = OnlineLearner(rows, LEVELS, MAX_BATCH).table
    node = OnlineLearner(seeded, LEVELS, MAX_BATCH).table
    ratio = node.mean_ms[0] / base.mean_ms[0]
    assert np.all(ratio > 1.7) and np.all(ratio < 2.3), ratio


# -- the dispatcher with a pool on two nodes --------------------------------------------------------


class TwoNodePool(WorkerPool):
    """One worker on each of two nodes; batches finish when the test says so, reporting their node."""

    per_node = True

    def __init__(self) -> None:
        self.manifests = {}
        self.nodes = ["slow", "fast"]  # listed slow first: the dispatcher must still plan for "fast" first
        self.busy: set[str] = set()
        self.submitted: list[tuple[object, str, asyncio.Future]] = []
        self.contention = {"slow": 0.0, "fast": 0.0}

    async def start(self) -> None:
        pass

    def idle_count(self) -> int:
        return len(self.idle_nodes())

    def idle_nodes(self) -> list[str]:
        return [n for n in self.nodes if n not in self.busy]

    def node_workers(self) -> dict[str, int]:
        return {n: 1 for n in self.nodes}

    def node_contention(self, node: str) -> float:
        return self.contention[node]

    def submit(self, task, node=None):
        assert node in self.idle_nodes(), (node, self.busy)
        self.busy.add(node)
        future = asyncio.get_running_loop().create_future()
        self.submitted.append((task, node, future))
        return future

    def finish(self, i: int, exec_ms: float) -> None:
        task, node, future = self.submitted[i]
        self.busy.discard(node)
        outputs = np.asarray(task.inputs)[:, :10].astype(np.float32)
        future.set_result(BatchResult(task.task_id, 0, outputs, exec_ms, "fake", node=node,
                                      contention=self.contention[node]))

    async def close(self) -> None:
        pass


async def test_the_dispatcher_plans_each_batch_for_its_workers_node_and_feeds_that_nodes_learner():
    pool = TwoNodePool()
    latency = StaticLatency({"m": FAST}, TABLES)
    scheduler = Scheduler({"m": ACC}, {"tight": SLOClassConfig("tight", latency_ms=3.2, min_accuracy=0.9)},
                          SLOAwarePolicy())
    clock = FakeClock()
    d = Dispatcher(scheduler, pool, clock, latency, {"m": ACC}, max_batch=MAX_BATCH, overhead_ms=0.0, workers=2)
    d.start()
    try:
        first = asyncio.create_task(d.infer("m", "tight", np.zeros(64, np.float32)))
        await until(lambda: len(pool.submitted) == 1, "the first batch")
        second = asyncio.create_task(d.infer("m", "tight", np.ones(64, np.float32)))
        await until(lambda: len(pool.submitted) == 2, "the second batch")
        # Both idle at first: the fast node's worker takes the first request at the most accurate level; the
        # slow node's, with 3.2 ms to go, can only run the second in time at level 0.5 (3.15 ms).
        assert [node for _, node, _ in pool.submitted] == ["fast", "slow"]
        assert [task.level for task, _, _ in pool.submitted] == [1.0, 0.5]
        pool.finish(1, 3.0)
        pool.finish(0, 1.0)
        results = await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert [r.level for r in results] == [1.0, 0.5]
        assert [(node, s.exec_ms) for _, node, s in latency.node_samples] == [("slow", 3.0), ("fast", 1.0)]
        assert d.driver.node_overhead_ms().keys() == {"slow", "fast"}
    finally:
        await d.drain(0.0)


# -- each node's learners in the server ------------------------------------------------------------


class NodesPool(TwoNodePool):
    """A per-node pool as the server's NodeLearners sees it: kernel tables and live workers per node."""

    def __init__(self, nodes: dict[str, int]) -> None:
        super().__init__()
        self.workers = dict(nodes)
        self.node_tables: dict[str, dict] = {node: {"m": kernel_table(1.0)} for node in nodes}

    def node_workers(self) -> dict[str, int]:
        return dict(self.workers)


class CountingLearner(OnlineLearner):
    def __init__(self) -> None:
        super().__init__([], LEVELS, MAX_BATCH)
        self.starts = self.stops = 0

    def start(self, *args, **kwargs):
        self.starts += 1
        return self

    def stop(self) -> None:
        self.stops += 1


async def settled(nodes: NodeLearners) -> None:
    """Every addition under way is done and its callback has run."""
    await asyncio.wait_for(asyncio.gather(*nodes.tasks, return_exceptions=True), 10)
    for _ in range(3):
        await asyncio.sleep(0)
    assert not nodes.tasks


async def test_node_learners_are_fitted_on_a_copy_of_the_pools_tables():
    pool = NodesPool({"a": 1})
    seen = []

    def build(node, tables):
        pool.node_tables["b"] = {"m": kernel_table(2.0)}  # the loop adds a node while the learners are fitted
        seen.append((node, tables))
        return {"m": CountingLearner()}

    nodes = NodeLearners(LearnedLatency({"m": OnlineLearner([], LEVELS, MAX_BATCH)}), pool, build)
    await nodes.add("a")
    [(node, tables)] = seen
    assert node == "a" and tables is not pool.node_tables and list(tables) == ["a"]
    assert nodes.latency.nodes() == ["a"]


async def test_stopping_cancels_node_learners_being_fitted_and_none_starts_after():
    pool = NodesPool({"a": 1})
    release = threading.Event()
    built = []

    def build(node, tables):
        release.wait(5)
        built.append(CountingLearner())
        return {"m": built[-1]}

    latency = LearnedLatency({"m": CountingLearner()})
    latency.start(process=False)  # a learner added from now on is started
    nodes = NodeLearners(latency, pool, build)
    nodes.node_up("a")
    await asyncio.sleep(0.01)
    assert nodes.tasks
    await nodes.stop()  # what the server does before latency.stop
    release.set()
    for _ in range(100):  # the fit finishes in its thread, after the cancelled addition
        if built:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.01)
    assert built and not nodes.tasks and latency.nodes() == [] and built[0].starts == 0
    nodes.node_up("b")  # a node that comes up during shutdown gets nothing
    assert not nodes.tasks


async def test_a_failed_node_learner_fit_is_logged(caplog):
    pool = NodesPool({"a": 1})

    def build(node, tables):
        raise KeyError(node)

    nodes = NodeLearners(LearnedLatency({"m": OnlineLearner([], LEVELS, MAX_BATCH)}), pool, build)
    with caplog.at_level(logging.ERROR, logger="slonn.scheduler.latency"):
        nodes.node_up("a")
        await settled(nodes)
    assert any("node a: its latency learners could not be fitted" in r.getMessage() for r in caplog.records)
    assert nodes.latency.nodes() == []


async def test_a_node_gone_for_a_minute_loses_its_learners_and_gets_new_ones_back():
    pool = NodesPool({"a": 1, "b": 2})
    built: dict[str, list[CountingLearner]] = {"a": [], "b": []}

    def build(node, tables):
        built[node].append(CountingLearner())
        return {"m": built[node][-1]}

    nodes = NodeLearners(LearnedLatency({"m": OnlineLearner([], LEVELS, MAX_BATCH)}), pool, build)
    await nodes.add("a")
    await nodes.add("b")
    pool.workers["a"] = 0  # a's last worker died
    assert await nodes.check(100.0) == []
    pool.workers["a"] = 1  # back within the minute: it keeps its learners
    assert await nodes.check(130.0) == []
    del pool.workers["a"]  # gone again
    assert await nodes.check(140.0) == []
    assert await nodes.check(199.0) == [] and nodes.latency.nodes() == ["a", "b"]
    assert await nodes.check(200.0) == ["a"]
    assert nodes.latency.nodes() == ["b"] and built["a"][0].stops == 1 and built["b"][0].stops == 0
    assert nodes.latency.table("m", "a") is nodes.latency.learners["m"].table  # the model's, meanwhile
    pool.workers["a"] = 1  # back: new learners, seeded again
    await nodes.check(300.0)
    await settled(nodes)
    assert nodes.latency.nodes() == ["a", "b"] and len(built["a"]) == 2
    assert nodes.latency.table("m", "a") is built["a"][1].table
