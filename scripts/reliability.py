"""`slonn reliability --json`: overload, chaos, bad input and shutdown against a real server process.

For each scenario: requests sent, answered OK, answered with each error code,
unanswered (must be 0), reject latency p99, and the server's peak memory
(VmHWM of the server process and of each worker).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from slonn.protos import slonn_pb2 as pb
from slonn.protos.client import AsyncSlonnClient
from slonn.scheduler.replay import replay
from slonn.scheduler.report import RequestRecord
from slonn.scheduler.serverproc import ServerProcess, child_pids
from slonn.scheduler.trace import poisson_arrivals
from slonn.workers.placement import set_niceness

MIX = {"interactive": 0.4, "standard": 0.45, "batch": 0.15}
CLIENT_START_S = 10.0
"""Load-generator processes start their windows together this long after launch (spawn + imports)."""

# Small queues make overload visible quickly (a user's config would size them to capacity x deadline).
OVERLOAD_CLASSES = """
[[class]]
name = "interactive"
latency_ms = 25
min_accuracy = 0.95
priority = 0
max_queue = 64

[[class]]
name = "standard"
latency_ms = 100
min_accuracy = 0.96
priority = 1
max_queue = 128

[[class]]
name = "batch"
latency_ms = 500
min_accuracy = 0.97
priority = 2
max_queue = 256
on_late = "serve"
mode = "accuracy"
"""


def worker_pids(server_pid: int) -> list[int]:
    """The server's spawned worker processes (not multiprocessing's resource tracker)."""
    out = []
    for pid in child_pids(server_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            out.append(pid)
    return out


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM (peak resident set) of ``pid`` in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def memory(server_pid: int) -> dict:
    return {"server_peak_mib": peak_rss_mib(server_pid),
            "workers_peak_mib": [peak_rss_mib(p) for p in worker_pids(server_pid)]}


def outcome(r: RequestRecord) -> str:
    """Who ended the call and when, from its status and message.

    - ``ok``: a result.
    - ``rejected``: refused at admission (queue full, in-flight cap, gRPC's concurrent-RPC limit, gRPC
      core's pending-request limit (CANCELLED), or a deadline already out of reach): the fast path.
    - ``expired``: admitted, then answered DEADLINE_EXCEEDED by the server once it could no longer make
      the deadline (before the deadline passed).
    - ``grpc_deadline``: the caller's own gRPC deadline ended the call before the server answered
      (DEADLINE_EXCEEDED raised by gRPC, message "Deadline Exceeded"): a terminal answer, but not ours.
    - ``unanswered``: no terminal status at all before the client gave up (must be 0).
    - otherwise the status name (UNAVAILABLE, CANCELLED, ...).
    """
    if r.status == "OK":
        return "ok"
    if r.status in ("UNANSWERED", "CLIENT_TIMEOUT"):
        return "unanswered"
    if r.status == "CANCELLED" and r.detail == "CANCELLED":
        return "rejected"  # shed by gRPC core at its pending-request limit (the server's --max-pending)
    if r.status == "RESOURCE_EXHAUSTED" or (r.status == "DEADLINE_EXCEEDED" and (
            "cannot be met for" in r.detail or "not admitted" in r.detail)):
        return "rejected"
    if r.status == "DEADLINE_EXCEEDED":
        return "grpc_deadline" if r.detail == "Deadline Exceeded" else "expired"
    return r.status


def reject_reason(r: RequestRecord) -> str:
    """Why a rejected call was refused: tells the server's own decisions from time lost before it."""
    if r.status == "CANCELLED":
        return "pending_shed"  # gRPC core: more calls waiting for the event loop than --max-pending allows
    if r.status == "RESOURCE_EXHAUSTED":
        return "queue_full" if "is full" in r.detail else "inflight_cap"  # gRPC's own: "Concurrent RPC limit"
    if "not admitted" in r.detail:
        return "arrived_too_late"  # reached the handler with <= 5 ms of its gRPC deadline left
    return "deadline_unreachable"  # backlog + the fastest level's run would miss the deadline


def _pcts(values: list[float]) -> dict:
    if not values:
        return {"p50_ms": None, "p99_ms": None}
    return {"p50_ms": round(float(np.percentile(values, 50)), 3), "p99_ms": round(float(np.percentile(values, 99)), 3)}


def _send_lag_p99_ms(records: list[RequestRecord]) -> float | None:
    """How far behind its schedule the open-loop sender fell (p99): a large value means the load
    generator, not the server, set the offered rate."""
    lags = [(r.send_s - r.scheduled_s) * 1e3 for r in records if r.scheduled_s is not None]
    return round(float(np.percentile(lags, 99)), 2) if lags else None


def tally(records: list[RequestRecord], duration_s: float) -> dict:
    kinds = [outcome(r) for r in records]
    outcomes = Counter(kinds)
    statuses = Counter(r.status for r, k in zip(records, kinds) if k not in ("ok", "unanswered"))
    ok = [r for r in records if r.status == "OK"]
    rejected = [r for r, k in zip(records, kinds) if k == "rejected"]
    by_reason: defaultdict[str, list[float]] = defaultdict(list)
    for r in rejected:
        by_reason[reject_reason(r)].append(r.latency_ms)
    return {
        "sent": len(records), "offered_per_s": round(len(records) / duration_s, 1),
        "send_lag_p99_ms": _send_lag_p99_ms(records),
        "answered_ok": len(ok), "ok_on_time": sum(r.on_time for r in ok),
        "ok_but_late": sum(not r.on_time for r in ok),
        "goodput_per_s": round(sum(r.on_time for r in ok) / duration_s, 1),
        "unanswered": outcomes.pop("unanswered", 0),
        "outcomes": dict(outcomes), "errors": dict(statuses),
        "reject_latency": _pcts([r.latency_ms for r in rejected]),
        "reject_latency_by_reason": {reason: {"count": len(v), **_pcts(v)}
                                     for reason, v in sorted(by_reason.items())},
        "expired_latency": _pcts([r.latency_ms for r, k in zip(records, kinds) if k == "expired"]),
        "ok_latency": _pcts([r.latency_ms for r in ok]),
    }


def _replay(target: str, model: str, rate: float, duration_s: float, seed: int,
            client_deadline: bool = False, start_at: float | None = None, nice: int = 0) -> list[RequestRecord]:
    if nice:
        set_niceness(os.getpriority(os.PRIO_PROCESS, 0) + nice)
    arrivals = poisson_arrivals(rate, duration_s, MIX, seed=seed)
    deadlines = {"interactive": 25.0, "standard": 100.0, "batch": 500.0}
    return asyncio.run(replay(target, model, arrivals, deadlines, progress=False, client_deadline=client_deadline,
                              start_at=start_at))


def _replay_from_processes(target: str, model: str, rate: float, duration_s: float, seed: int, clients: int,
                           client_deadline: bool = False, nice: int = 0) -> list[RequestRecord]:
    """``_replay`` split over ``clients`` processes (rate / clients each, own seeds), records merged.

    One Python client stays on schedule up to about 1,000 unary calls/s on these 2 cores; to offer a
    multiple of a server that answers about as many, the load has to come from several processes.
    """
    if clients <= 1:  # in this process, which must not be reniced: the scenarios after it share it
        return _replay(target, model, rate, duration_s, seed, client_deadline)
    ctx = mp.get_context("spawn")
    start_at = time.time() + CLIENT_START_S  # every client's window starts together, after its imports
    with ProcessPoolExecutor(clients, mp_context=ctx) as ex:
        parts = list(ex.map(_replay, *zip(*[(target, model, rate / clients, duration_s, seed * 100 + k,
                                             client_deadline, start_at, nice) for k in range(clients)])))
    out: list[RequestRecord] = []
    for part in parts:  # indices run on across clients, so they stay unique
        offset = len(out)
        for r in part:
            r.index += offset
        out.extend(part)
    return out


def overload(model_dir: Path, rate: float, duration_s: float, max_inflight: int, clients: int,
             log_dir: Path, client_nice: int = 0, max_pending: int = 32) -> dict:
    """Offered load far above what the server answers in time, from clients that send their deadline.

    The clients set each call's gRPC deadline to its class deadline (what a latency-sensitive client
    does): the server then knows the time a call spent reaching it, and a call still queued in the
    transport when its deadline passes is ended by gRPC itself (``grpc_deadline``), never left hanging.
    ``max_inflight`` is gRPC's concurrent-RPC limit, sized to capacity x deadline (Little's law):
    beyond it gRPC refuses calls RESOURCE_EXHAUSTED before any of our code runs.
    """
    classes = log_dir / "overload_classes.toml"
    classes.write_text(OVERLOAD_CLASSES)
    with ServerProcess(["--model-dir", str(model_dir), "--classes", str(classes), "--max-inflight",
                        str(max_inflight), "--max-pending", str(max_pending)], log_dir / "overload.log") as srv:
        records = _replay_from_processes(srv.target, _model_name(model_dir), rate, duration_s, seed=1,
                                         clients=clients, client_deadline=True, nice=client_nice)
        mem = memory(srv.proc.pid)
    out = tally(records, duration_s)
    out["clients"], out["client_nice"] = clients, client_nice
    out["offered_over_goodput"] = round(out["offered_per_s"] / max(out["goodput_per_s"], 1e-9), 2)
    return {**out, "max_inflight": max_inflight, "max_pending": max_pending, **mem,
            "server_exit_code": srv.returncode}


def chaos(model_dir: Path, rate: float, duration_s: float, kill_every_s: float, workers: int,
          log_dir: Path) -> dict:
    kills = []
    with ServerProcess(["--model-dir", str(model_dir), "--workers", str(workers)], log_dir / "chaos.log") as srv:
        async def killer() -> None:
            t_end = time.monotonic() + duration_s
            while time.monotonic() < t_end:
                await asyncio.sleep(kill_every_s)
                pids = worker_pids(srv.proc.pid)
                if pids:  # one worker at a time, in turn: the others keep serving
                    pid = pids[len(kills) % len(pids)]
                    try:
                        os.kill(pid, signal.SIGKILL)
                        kills.append(pid)
                    except ProcessLookupError:
                        pass

        async def both() -> list[RequestRecord]:
            arrivals = poisson_arrivals(rate, duration_s, MIX, seed=2)
            deadlines = {"interactive": 25.0, "standard": 100.0, "batch": 500.0}
            k = asyncio.create_task(killer())
            records = await replay(srv.target, _model_name(model_dir), arrivals, deadlines, progress=False)
            await k
            return records

        records = asyncio.run(both())
        # Still serving after the chaos?
        after = _replay(srv.target, _model_name(model_dir), 20, 1.0, seed=3)
        mem = memory(srv.proc.pid)
    return {**tally(records, duration_s), "workers_killed": len(kills),
            "after_chaos_ok": sum(r.status == "OK" for r in after), "after_chaos_sent": len(after),
            **mem, "server_exit_code": srv.returncode}


def bad_inputs(model: str) -> list[tuple[str, pb.InferRequest]]:
    good = np.ones(64, np.float32)

    def req(**kw) -> pb.InferRequest:
        base = dict(model=model, slo_class="standard",
                    input=pb.Tensor(shape=[64], dtype=pb.FLOAT32, data=good.tobytes()))
        base.update(kw)
        return pb.InferRequest(**base)

    nan = good.copy()
    nan[3] = np.nan
    return [
        ("wrong_shape", req(input=pb.Tensor(shape=[8, 8], dtype=pb.FLOAT32, data=good.tobytes()))),
        ("huge_shape", req(input=pb.Tensor(shape=[1 << 40], dtype=pb.FLOAT32, data=good.tobytes()))),
        ("wrong_dtype", req(input=pb.Tensor(shape=[64], dtype=pb.DATA_TYPE_UNSPECIFIED, data=good.tobytes()))),
        ("short_data", req(input=pb.Tensor(shape=[64], dtype=pb.FLOAT32, data=good.tobytes()[:-4]))),
        ("nan", req(input=pb.Tensor(shape=[64], dtype=pb.FLOAT32, data=nan.tobytes()))),
        ("empty", req(input=pb.Tensor(shape=[0], dtype=pb.FLOAT32, data=b""))),
        ("no_input", pb.InferRequest(model=model, slo_class="standard")),
        ("unknown_model", req(model="nope")),
        ("unknown_class", req(slo_class="nope")),
        ("negative_budget", req(latency_budget_ms=-1.0)),
        ("impossible_budget", req(latency_budget_ms=0.001)),
    ]


def fuzz(model_dir: Path, log_dir: Path) -> dict:
    model = _model_name(model_dir)
    with ServerProcess(["--model-dir", str(model_dir)], log_dir / "fuzz.log") as srv:
        async def run() -> dict:
            out = {}
            async with AsyncSlonnClient(srv.target) as client:
                for name, request in bad_inputs(model):
                    try:
                        await client.stub.Infer(request, timeout=10)
                        out[name] = "OK"
                    except grpc.aio.AioRpcError as exc:
                        out[name] = f"{exc.code().name}: {exc.details()}"
                good = await client.infer(model, "standard", np.ones(64, np.float32), timeout_s=10)
                out["good_after"] = f"OK level {good.level}"
            return out
        answers = asyncio.run(run())
    return {"answers": answers, "server_exit_code": srv.returncode}


def shutdown(model_dir: Path, rate: float, duration_s: float, stop_after_s: float, log_dir: Path) -> dict:
    with ServerProcess(["--model-dir", str(model_dir), "--grace-s", "5"], log_dir / "shutdown.log") as srv:
        async def run() -> list[RequestRecord]:
            arrivals = poisson_arrivals(rate, duration_s, MIX, seed=4)
            deadlines = {"interactive": 25.0, "standard": 100.0, "batch": 500.0}
            task = asyncio.create_task(replay(srv.target, _model_name(model_dir), arrivals, deadlines,
                                              progress=False))
            await asyncio.sleep(stop_after_s)
            srv.proc.send_signal(signal.SIGTERM)
            return await task
        records = asyncio.run(run())
        code = srv.proc.wait(60)
    return {**tally(records, duration_s), "sigterm_at_s": stop_after_s, "server_exit_code": code}


def _model_name(model_dir: Path) -> str:
    from slonn.workers.artifact import load_manifest

    return load_manifest(model_dir).name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slonn reliability", description=__doc__)
    p.add_argument("--model-dir", type=Path, default=Path("models/digits-mlp"))
    p.add_argument("--scenarios", default="overload,chaos,fuzz,shutdown")
    p.add_argument("--overload-rate", type=float, default=3000.0,
                   help="offered load of the overload scenario, split over --overload-clients processes")
    p.add_argument("--overload-max-inflight", type=int, default=32)
    p.add_argument("--overload-max-pending", type=int, default=32,
                   help="the server's --max-pending in the overload scenario (0 = gRPC's default, 1000)")
    p.add_argument("--overload-client-nice", type=int, default=0,
                   help="niceness of the load-generator processes: 10 leaves the server the CPU it would have "
                        "with its clients on other machines (the offered rate then falls behind schedule sooner)")
    p.add_argument("--overload-clients", type=int, default=3,
                   help="load-generator processes (one Python client stays on schedule up to about 1000 "
                        "unary calls/s on 2 cores; send_lag_p99_ms in the output says whether they kept up)")
    p.add_argument("--rate", type=float, default=200.0, help="offered load of chaos and shutdown")
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument("--kill-every-s", type=float, default=3.0)
    p.add_argument("--workers", type=int, default=2, help="worker processes in the chaos scenario")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="slonn-reliability-"))
    scenarios = {
        "overload": lambda: overload(args.model_dir, args.overload_rate, args.duration_s / 2,
                                     args.overload_max_inflight, args.overload_clients, log_dir,
                                     args.overload_client_nice, args.overload_max_pending),
        "chaos": lambda: chaos(args.model_dir, args.rate, args.duration_s, args.kill_every_s, args.workers, log_dir),
        "fuzz": lambda: fuzz(args.model_dir, log_dir),
        "shutdown": lambda: shutdown(args.model_dir, args.rate, args.duration_s, args.duration_s / 2, log_dir),
    }
    results = {"server_logs": str(log_dir)}
    for name in args.scenarios.split(","):
        results[name] = scenarios[name]()
        print(f"{name}: {json.dumps(results[name])}", flush=True) if not args.json else None
    if args.json:
        print(json.dumps(results, indent=2))
    return 0
