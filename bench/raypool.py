"""RayPool against ProcessPool on this machine; each subcommand prints one JSON result.

- ``overhead``: per batch, the pool's submit-to-result time minus the model's own exec time (what the
  dispatcher learns as overhead on top of the model), p50/p99, ProcessPool (1 worker) vs RayPool (1 actor,
  a local Ray), in alternating rounds.
- ``replay``: `slonn replay` at one rate against two live servers, ProcessPool with 2 workers vs RayPool
  with 2 actors on a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, one CPU per
  node); both servers stay up and the arms alternate round by round. On a 2-core machine this shows
  correctness and overhead, not a speed-up: both arms share the same two cores.
- ``chaos``: the RayPool server under replay while the worker node is removed: sent, answered by status
  code, unanswered (must be 0).

    python -m bench.raypool overhead --model-dir models/digits-mlp
    python -m bench.raypool replay --model-dir models/digits-mlp --rate 100
    python -m bench.raypool chaos --model-dir models/digits-mlp --rate 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

NODE = {"num_cpus": 1, "object_store_memory": 100 << 20}
"""Each local Ray node: one CPU, a small object store (the machine is shared)."""


def percentiles(xs: list[float]) -> dict:
    a = np.asarray(xs)
    return {"n": len(a), "p50_ms": round(float(np.percentile(a, 50)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3), "mean_ms": round(float(a.mean()), 3)}


def machine() -> dict:
    import ray
    import torch

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__,
            "torch": torch.__version__, "load_avg_at_start": os.getloadavg()}


async def overhead(model_dir: Path, rounds: int, batches: int, batch_size: int) -> dict:
    from slonn.workers.pool import ProcessPool
    from slonn.workers.process import WorkerSpec
    from slonn.workers.protocol import BatchTask
    from slonn.scheduler.server import ray_monitor
    from slonn.workers.raypool import RayOptions, RayPool

    spec = WorkerSpec((model_dir,), "cpu")
    pools = {"process": ProcessPool(spec, 1), "ray": RayPool(spec, 1, RayOptions(), monitor_factory=ray_monitor)}
    for pool in pools.values():
        await pool.start()
    manifest = next(iter(pools["process"].manifests.values()))
    x = np.random.default_rng(0).uniform(0, 16, (batch_size, manifest.arch.in_features)).astype(np.float32)
    samples: dict[str, list[float]] = {name: [] for name in pools}
    exec_ms: dict[str, list[float]] = {name: [] for name in pools}
    task_id = 0
    try:
        for r in range(rounds):
            for name in (("process", "ray") if r % 2 == 0 else ("ray", "process")):
                for _ in range(batches):
                    t0 = time.perf_counter()
                    result = await pools[name].submit(BatchTask(task_id, manifest.name, manifest.levels[0], x))
                    samples[name].append((time.perf_counter() - t0) * 1e3 - result.exec_ms)
                    exec_ms[name].append(result.exec_ms)
                    task_id += 1
    finally:
        for pool in pools.values():
            await pool.close()
    return {"what": "submit-to-result minus exec, per batch", "batch_size": batch_size, "rounds": rounds,
            "batches_per_round": batches,
            "arms": {n: {"overhead": percentiles(samples[n]), "exec": percentiles(exec_ms[n])} for n in pools}}


def two_node_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    worker_node = cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    return cluster, worker_node


def learned_overhead_ms(log_path: Path) -> float | None:
    """The dispatcher's overhead allowance in the server log's last stats line."""
    found = re.findall(r"overhead ([0-9.]+) ms", log_path.read_text())
    return float(found[-1]) if found else None


def servable_classes(model_dir: Path, path: Path) -> Path:
    """The packaged SLO classes with each accuracy floor capped at the model's best level, written to
    ``path``: a small model then has every class served rather than refused FAILED_PRECONDITION."""
    from slonn.scheduler.config import load_classes
    from slonn.workers.artifact import load_manifest

    best = max(load_manifest(model_dir).accuracy.values())
    tables = []
    for c in load_classes().values():
        tables.append(f'[[class]]\nname = "{c.name}"\nlatency_ms = {c.latency_ms}\n'
                      f'min_accuracy = {min(c.min_accuracy, math.floor(best * 1000) / 1000)}\npriority = {c.priority}\n'
                      f'max_queue = {c.max_queue}\non_late = "{c.on_late}"\nmode = "{c.mode}"\n')
    path.write_text("\n".join(tables))
    return path


def serve_args(model_dir: Path, pool: str, address: str = "") -> list[str]:
    classes = servable_classes(model_dir, Path(os.environ.get("TMPDIR", "/tmp")) / f"slonn-bench-classes-{os.getpid()}.toml")
    args = ["--model-dir", str(model_dir), "--workers", "2", "--stats-interval-s", "1", "--classes", str(classes)]
    if pool == "ray":
        args += ["--pool", "ray", "--ray-address", address, "--ray-strategy", "STRICT_SPREAD"]
    return args


def run_replay(target: str, model: str, rate: float, duration_s: float, during=None):
    """One replay (generous client deadlines: every server answer is seen); ``during(t0)`` runs beside it."""
    from slonn.scheduler.config import load_classes
    from slonn.scheduler.replay import replay
    from slonn.scheduler.trace import make_arrivals

    arrivals = make_arrivals(start_s=0.0, duration_s=None, target_rate=rate)  # the whole trace, at ``rate``
    keep = arrivals.offsets_s < duration_s  # its first ``duration_s`` seconds
    arrivals = replace(arrivals, offsets_s=arrivals.offsets_s[keep],
                       classes=[c for c, k in zip(arrivals.classes, keep) if k],
                       window_s=(arrivals.window_s[0], arrivals.window_s[0] + duration_s * arrivals.speedup))
    deadlines = {n: c.latency_ms for n, c in load_classes().items()}

    async def body():
        side = asyncio.create_task(during()) if during else None
        records = await replay(target, model, arrivals, deadlines, progress=False)
        if side:
            await side
        return records

    return asyncio.run(body()), duration_s


def replay_arms(model_dir: Path, model: str, rate: float, duration_s: float, rounds: int, log_dir: Path) -> dict:
    from slonn.scheduler.report import summarize
    from slonn.scheduler.serverproc import ServerProcess

    cluster, _ = two_node_cluster()
    out: dict = {"rate_per_s": rate, "duration_s_per_round": duration_s, "rounds": rounds, "arms": {}}
    try:
        logs = {"process": log_dir / "process.log", "ray": log_dir / "ray.log"}
        with ServerProcess(serve_args(model_dir, "process"), logs["process"]) as sp, \
                ServerProcess(serve_args(model_dir, "ray", cluster.address), logs["ray"]) as sr:
            servers = {"process": sp, "ray": sr}
            records: dict[str, list] = {n: [] for n in servers}
            for r in range(rounds):
                for name in (("process", "ray") if r % 2 == 0 else ("ray", "process")):
                    recs, _ = run_replay(servers[name].target, model, rate, duration_s)
                    records[name] += recs
            for name in servers:
                out["arms"][name] = {"summary": summarize(records[name], duration_s * rounds)["all"],
                                     "learned_overhead_ms": learned_overhead_ms(logs[name])}
    finally:
        cluster.shutdown()
    return out


def chaos(model_dir: Path, model: str, rate: float, duration_s: float, remove_at_s: float, log_dir: Path) -> dict:
    from slonn.scheduler.serverproc import ServerProcess

    cluster, worker_node = two_node_cluster()
    try:
        with ServerProcess(serve_args(model_dir, "ray", cluster.address), log_dir / "chaos.log") as srv:
            async def remove() -> None:
                await asyncio.sleep(remove_at_s)
                await asyncio.to_thread(cluster.remove_node, worker_node)

            records, _ = run_replay(srv.target, model, rate, duration_s, remove)
    finally:
        cluster.shutdown()
    codes = Counter(r.status for r in records)
    unanswered = sum(codes.pop(s, 0) for s in ("UNANSWERED", "CLIENT_TIMEOUT"))
    lost = re.findall(r"ray worker \d+ \(node \w+\) lost", (log_dir / "chaos.log").read_text())
    return {"rate_per_s": rate, "duration_s": duration_s, "node_removed_at_s": remove_at_s, "sent": len(records),
            "answered_by_code": dict(codes), "unanswered": unanswered, "workers_lost": len(lost)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.raypool", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("overhead", "replay", "chaos"))
    p.add_argument("--model-dir", type=Path, default=Path("models/digits-mlp"))
    p.add_argument("--model", default="digits-mlp")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds per arm (overhead, replay)")
    p.add_argument("--batches", type=int, default=200, help="overhead: batches per arm per round")
    p.add_argument("--batch-size", type=int, default=8, help="overhead: requests per batch")
    p.add_argument("--rate", type=float, default=100.0, help="replay, chaos: mean requests/s")
    p.add_argument("--duration-s", type=float, default=15.0, help="replay: per round; chaos: the whole run")
    p.add_argument("--log-dir", type=Path, default=Path("runs/bench-raypool"))
    args = p.parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    out = {"machine": machine(), "what": args.what}
    if args.what == "overhead":
        out |= asyncio.run(overhead(args.model_dir, args.rounds, args.batches, args.batch_size))
    elif args.what == "replay":
        out |= replay_arms(args.model_dir, args.model, args.rate, args.duration_s, args.rounds, args.log_dir)
    else:
        out |= chaos(args.model_dir, args.model, args.rate, args.duration_s, args.duration_s / 3, args.log_dir)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
