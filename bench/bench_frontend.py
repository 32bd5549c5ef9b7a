"""`python -m bench.bench_frontend`: CPU per request of the serving path, by process (Linux /proc).

Starts `slonn serve` on loopback and sends, in one run:
- ``health``: gRPC health checks, one at a time: what a null RPC costs grpc.aio on this machine;
- ``infer_seq``: Infer calls one at a time (each batch has one request: the per-batch costs show);
- ``infer_conc``: Infer calls with ``--concurrency`` in flight (batches form: per-request costs).

For each phase it prints the CPU time per request of the server process (all its threads: gRPC core,
event loop, contention monitor), of its children (workers and the learner's fit process) and of this
client, and the wall time per request. Distinct inputs per call (held-out digits, each with its own
small noise). On a machine where the load generator shares the cores with the server, these figures
bound the rate a live replay can reach; the simulator's ``--ingress-ms-per-request`` is the server's
figure for ``infer_conc``. Extra `slonn serve` arguments go after ``--``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from slonn.scheduler.serverproc import process_cpu_s
from slonn.scheduler.sweep import distinct_inputs


async def measure(target: str, server_pid: int, model: str, slo_class: str, n: int, concurrency: int) -> dict:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from slonn.protos.client import AsyncSlonnClient
    from slonn.scheduler.serverproc import child_pids

    x = distinct_inputs(3 * n)
    phases = {}
    async with AsyncSlonnClient(target) as client:
        await client.wait_ready()
        health = health_pb2_grpc.HealthStub(client.channel)
        for i in range(50):  # warm both sides
            await client.infer(model, slo_class, x[i])
        used = iter(range(3 * n))

        async def infer_loop(count: int) -> None:
            for _ in range(count):
                await client.infer(model, slo_class, x[next(used)])

        for name in ("health", "infer_seq", "infer_conc"):
            kids = child_pids(server_pid, all_threads=True)
            s0, k0 = process_cpu_s(server_pid), sum(map(process_cpu_s, kids))
            c0, t0 = time.process_time(), time.perf_counter()
            if name == "health":
                for _ in range(n):
                    await health.Check(health_pb2.HealthCheckRequest())
            elif name == "infer_seq":
                await infer_loop(n)
            else:
                shares = [n // concurrency + (i < n % concurrency) for i in range(concurrency)]
                await asyncio.gather(*(infer_loop(k) for k in shares))
            wall = time.perf_counter() - t0
            phases[name] = {
                "server_cpu_ms": round((process_cpu_s(server_pid) - s0) / n * 1e3, 3),
                "children_cpu_ms": round((sum(map(process_cpu_s, kids)) - k0) / n * 1e3, 3),
                "client_cpu_ms": round((time.process_time() - c0) / n * 1e3, 3),
                "wall_ms": round(wall / n * 1e3, 3),
            }
    return phases


def main(argv: list[str] | None = None) -> int:
    from slonn.scheduler import aio
    from slonn.scheduler.serverproc import ServerProcess

    p = argparse.ArgumentParser(prog="python -m bench.bench_frontend", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=Path("models/digits-mlp"))
    p.add_argument("--model", default="digits-mlp")
    p.add_argument("--slo-class", default="standard")
    p.add_argument("--requests", type=int, default=1500, help="per phase")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--log", type=Path, default=Path("runs/bench-frontend-server.log"))
    p.add_argument("--event-loop", choices=aio.EVENT_LOOPS, default=aio.DEFAULT_EVENT_LOOP,
                   help="event loop of the server and of this client")
    p.add_argument("serve_args", nargs="*", help="extra `slonn serve` arguments (after --)")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        p.error("--requests and --concurrency must be >= 1")
    if not Path("/proc/self/stat").exists():
        print("bench_frontend reads /proc: Linux only", file=sys.stderr)
        return 2
    serve_args = ["--model-dir", str(args.model_dir), "--event-loop", args.event_loop, *args.serve_args]
    with ServerProcess(serve_args, args.log) as server:
        phases = aio.run(measure(server.target, server.proc.pid, args.model, args.slo_class, args.requests,
                                 args.concurrency), args.event_loop)
    health = phases["health"]["server_cpu_ms"]
    out = {"requests_per_phase": args.requests, "concurrency": args.concurrency, "cpus": os.cpu_count(),
           "event_loop": args.event_loop,
           "phases": phases,
           "server_cpu_vs_null_rpc": {k: round(v["server_cpu_ms"] / max(health, 1e-9), 2)
                                      for k, v in phases.items() if k != "health"}}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
