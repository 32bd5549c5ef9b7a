"""RayPool on a two-node Ray cluster on this machine: a real server whose workers are Ray actors.

Every test checks the reliability invariant (each request sent gets exactly one terminal answer, nothing
hangs) plus where the work ran. Skipped without Ray (``pip install -e '.[ray]'``; CI installs it).
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import pytest
import pytest_asyncio

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from slonn.scheduler.config import ServerConfig, SLOClassConfig  # noqa: E402
from slonn.scheduler.server import SlonnServer, ray_monitor  # noqa: E402
from slonn.workers.process import WorkerSpec  # noqa: E402
from slonn.workers.raypool import RayOptions, RayPool  # noqa: E402
from tests.serving import outcome, x  # noqa: E402

MODEL = "tiny"
CLASSES = {"roomy": SLOClassConfig("roomy", latency_ms=20_000, max_queue=4096, on_late="serve")}
NODE = {"num_cpus": 1, "object_store_memory": 80 << 20}
"""Each node: one CPU (one worker), a small object store (the machine is shared)."""
BOUND_S = 120.0
"""No step of a test may take longer than this (a hang fails the test instead of stalling the run)."""
START_BOUND_S = 300.0
"""Starting workers (a Ray worker process, torch, the model, the kernel table) may take this long: on a
machine whose cores are all taken by other work it has taken over 120 s."""


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    worker_node = c.add_node(**NODE)
    c.wait_for_nodes()
    yield c, worker_node
    c.shutdown()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(cluster, tiny_model_dir):
    c, _ = cluster
    cfg = ServerConfig(model_dirs=(tiny_model_dir,), classes=CLASSES, host="127.0.0.1", port=0, workers=2,
                       max_batch=16, grace_s=5.0, max_pending=1000, pool="ray", ray_address=c.address,
                       ray_strategy="STRICT_SPREAD")
    srv = SlonnServer(cfg)
    async with asyncio.timeout(START_BOUND_S):
        await srv.start()
    yield srv
    async with asyncio.timeout(BOUND_S):
        await srv.stop()
    if ray.is_initialized():
        ray.shutdown()


async def load(client, first: int, n: int, during=None) -> Counter:
    """``n`` concurrent requests; ``during`` (a coroutine function) runs once they are in flight."""
    async with asyncio.timeout(BOUND_S):
        calls = [asyncio.create_task(outcome(client.infer(MODEL, "roomy", x(i), timeout_s=90)))
                 for i in range(first, first + n)]
        await asyncio.sleep(0.05)
        if during is not None:
            await during()
        return Counter(await asyncio.gather(*calls))


async def workers_up(pool: RayPool, n: int) -> None:
    async with asyncio.timeout(START_BOUND_S):
        while len(pool.actors()) < n:
            await asyncio.sleep(0.1)


@pytest.mark.asyncio(loop_scope="module")
async def test_requests_are_served_by_workers_on_both_nodes(server, client):
    statuses = await load(client, 0, 300)
    assert statuses == Counter(OK=300)
    nodes = server.pool.nodes()
    assert len(nodes) == 2, nodes
    assert all(d["workers"] == 1 and d["batches"] > 0 for d in nodes.values()), nodes
    # Each batch came back with its node's contention and the Ray call's own overhead was measured.
    assert all(math.isfinite(d["contention"]) and d["contention"] >= 0 for d in nodes.values())
    assert len(server.pool.call_overhead_ms) >= 2 and server.pool.overhead_floor_ms() > 0
    assert len(server.pool.node_tables) == 2  # a kernel table measured on each node
    # A latency model per node, trained by that node's batches, and each batch planned for its node.
    assert server.latency.nodes() == sorted(nodes)
    for node, d in nodes.items():
        learner = server.latency.node_learners[(MODEL, node)]
        assert learner.observed > 0 and server.latency.table(MODEL, node) is learner.table
        assert server.metrics.registry.get_sample_value("slonn_node_batches_total", {"node": node}) > 0
        assert server.metrics.registry.get_sample_value("slonn_node_table_ms", {"model": MODEL, "node": node}) > 0
    assert server.latency.learners[MODEL].observed == 0  # the model's own learner only seeded the nodes'
    assert server.dispatcher.driver.node_overhead_ms().keys() == nodes.keys()


@pytest.mark.asyncio(loop_scope="module")
async def test_an_actor_killed_under_load_is_replaced_and_every_request_answered(server, client):
    restarts = server.pool.restarts

    async def kill_one() -> None:
        ray.kill(server.pool.actors()[0], no_restart=True)

    statuses = await load(client, 1000, 300, kill_one)
    assert sum(statuses.values()) == 300
    assert set(statuses) <= {"OK", "UNAVAILABLE"}, statuses
    assert statuses["OK"] > 0
    assert server.pool.restarts == restarts + 1
    await workers_up(server.pool, 2)  # the replacement takes the dead one's place in the placement group
    assert len(server.pool.nodes()) == 2
    assert await outcome(client.infer(MODEL, "roomy", x(1), timeout_s=60)) == "OK"


@pytest.mark.asyncio(loop_scope="module")
async def test_a_pool_that_cannot_be_placed_says_why(server, tiny_model_dir):
    # Three one-CPU workers on distinct nodes of a two-node cluster (whose CPUs are taken anyway).
    pool = RayPool(WorkerSpec((tiny_model_dir,), "cpu", calibrate=False), workers=3, monitor_factory=ray_monitor,
                   options=RayOptions(strategy="STRICT_SPREAD", place_timeout_s=2.0))
    with pytest.raises(RuntimeError, match="could not place 3 worker"):
        async with asyncio.timeout(BOUND_S):
            await pool.start()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_node_removed_under_load_leaves_no_request_unanswered(server, client, cluster):
    c, worker_node = cluster
    restarts = server.pool.restarts

    async def remove_node() -> None:
        await asyncio.to_thread(c.remove_node, worker_node)

    statuses = await load(client, 2000, 300, remove_node)
    assert sum(statuses.values()) == 300
    assert set(statuses) <= {"OK", "UNAVAILABLE"}, statuses
    assert server.pool.restarts == restarts + 1
    # The lost node's worker waits for room that no longer exists; the head node's serves on.
    assert len(server.pool.nodes()) == 1 and not server.pool.broken()
    statuses = await load(client, 3000, 50)
    assert statuses == Counter(OK=50)
