"""RayPool's parts that need no cluster: artifact packing, options, config, the missing-Ray error, and which
worker (and so whose contention) the next batch gets."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import torch

from slonn.scheduler.config import ServerConfig, SLOClassConfig
from slonn.scheduler.server import ray_monitor
from slonn.scripts import serve
from slonn.workers.artifact import MANIFEST_FILE, WEIGHTS_FILE, ModelManifest, load_artifact, save_artifact
from slonn.workers.model import MLPArchitecture, SLOAwareMLP
from slonn.workers.process import WorkerSpec
from slonn.workers.raypool import RayOptions, RayPool, _Actor, import_ray
from slonn.workers.rayworker import pack_artifacts, unpack_artifacts


def test_packed_artifacts_load_the_same_models_elsewhere(tmp_path):
    sources = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        arch = MLPArchitecture(in_features=8, hidden=(16,), out_features=3)
        manifest = ModelManifest(name=f"m{seed}", arch=arch, levels=(1.0, 0.5), accuracy={1.0: 0.9, 0.5: 0.8})
        sources.append(save_artifact(SLOAwareMLP(arch), manifest, tmp_path / "src" / f"m{seed}"))
    dirs = unpack_artifacts(pack_artifacts(tuple(sources)), tmp_path / "node")
    assert len(dirs) == 2
    for source, directory in zip(sources, dirs):
        for name in (MANIFEST_FILE, WEIGHTS_FILE):
            assert (directory / name).read_bytes() == (source / name).read_bytes()
    model, manifest = load_artifact(dirs[1])
    original, original_manifest = load_artifact(sources[1])
    assert manifest == original_manifest
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), original.state_dict().values()))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"num_cpus": 0}, "num_cpus"),
    ({"num_gpus": -1}, "num_gpus"),
    ({"strategy": "RANDOM"}, "strategy"),
    ({"place_timeout_s": 0}, "place_timeout_s"),
])
def test_ray_options_name_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RayOptions(**kwargs)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"pool": "k8s"}, "pool"),
    ({"pool": "ray", "in_process": True}, "in_process"),
    ({"pool": "ray", "worker_spin_ms": 5.0}, "worker_spin_ms"),
    ({"pool": "ray", "worker_cpus": (0,)}, "worker_cpus"),
    ({"pool": "ray", "ray_num_cpus": 0.0}, "ray_num_cpus"),
])
def test_server_config_checks_the_pool_fields(kwargs, field):
    base = {"model_dirs": (Path("m"),), "classes": {"c": SLOClassConfig("c", 20)}}
    with pytest.raises(ValueError, match=field):
        ServerConfig(**{**base, **kwargs})


def test_without_ray_the_pool_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RuntimeError, match=r"slonn\[ray\]"):
        import_ray()


def test_serve_with_the_ray_pool_and_no_ray_is_a_clear_error(monkeypatch, capsys, tmp_path):
    real = serve.importlib.util.find_spec
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert serve.main(["--pool", "ray", "--model-dir", str(tmp_path)]) == 2
    assert "--pool ray needs Ray" in capsys.readouterr().err


def test_the_next_batch_goes_to_the_least_contended_idle_worker_and_plans_with_its_contention():
    async def body() -> None:
        pool = RayPool(WorkerSpec((Path("m"),)), workers=3, options=RayOptions(), monitor_factory=ray_monitor)
        loop = asyncio.get_running_loop()
        busy, calm, loaded = (_Actor(i, None, loop) for i in range(3))
        busy.contention, calm.contention, loaded.contention = 2.0, 0.25, 1.0
        pool._workers = {w.worker_id: w for w in (busy, calm, loaded)}
        pool._idle = [loaded, calm]
        assert pool.contention() == 0.25 and pool._next() is calm
        pool._idle = []
        assert pool.contention() == 2.0  # nobody idle: the worst live node, for expiry decisions

    asyncio.run(body())


def test_the_pool_names_its_idle_workers_nodes_and_runs_a_batch_on_the_node_it_was_planned_for():
    async def body() -> None:
        pool = RayPool(WorkerSpec((Path("m"),)), workers=3, options=RayOptions(), monitor_factory=ray_monitor)
        loop = asyncio.get_running_loop()
        a1, a2, b1 = (_Actor(i, None, loop) for i in range(3))
        for w, node in ((a1, "a"), (a2, "a"), (b1, "b")):
            w.node = node
            w.ready.set_result(None)
        pool._workers = {w.worker_id: w for w in (a1, a2, b1)}
        pool._reported(a1, 0.5)
        pool._reported(a2, 0.4)
        pool._reported(b1, 0.1)
        pool._idle = [a1, b1]
        assert pool.idle_nodes() == ["b", "a"]  # least contended first, as submit() hands them out
        assert pool._next() is b1 and pool._next("a") is a1 and pool._next("c") is b1
        assert pool.node_workers() == {"a": 2, "b": 1}
        assert pool.node_contention("a") == 0.4 and pool.node_contention("b") == 0.1  # the latest report
        assert pool.node_contention("c") == 0.0

    asyncio.run(body())


def test_a_pool_without_workers_for_the_place_timeout_reads_as_broken_until_one_is_ready():
    async def body() -> None:
        pool = RayPool(WorkerSpec((Path("m"),)), workers=1, options=RayOptions(place_timeout_s=0.05),
                       monitor_factory=ray_monitor)
        pool._loop = asyncio.get_running_loop()
        woken = []
        pool.on_idle = lambda: woken.append(True)
        pending = _Actor(0, None, pool._loop)  # a replacement still waiting for room
        pool._workers = {0: pending}
        pool._check_empty()
        assert not pool.broken()  # not yet: the replacement may come up
        await asyncio.sleep(0.2)
        assert pool.broken() and woken  # the dispatcher was woken to answer UNAVAILABLE
        pending.ready.set_result(None)  # it came up after all
        assert not pool.broken()

    asyncio.run(body())
