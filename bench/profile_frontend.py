"""Where the server process's CPU goes under open-loop load, and grpc.aio's own floor.

Runs, interleaved ``--repeat`` times, the same open-loop Poisson unary load (``--rate`` for ``--duration-s``,
distinct inputs, the generator of `slonn sweep`) against:
- ``empty``: a grpc.aio server of the same proto whose Infer returns a constant (``--serve-empty``): what
  grpc.aio and the event loop cost per call with no work in the handler, the floor of any servicer;
- ``slonn``: `slonn serve` from this checkout;
- ``baseline`` (with ``--baseline DIR``): `slonn serve` from another checkout (e.g. ``git archive`` of an
  older commit), to compare two versions in one window.
For each it prints the server process's and its children's CPU per call (Linux /proc). CPU per call, not
wall time, is the figure to trust on a shared machine; the spread over the repeats says how much.

Then, unless ``--no-profile``, it samples `slonn serve` under the same load with py-spy (Python frames,
non-blocking; ``--native`` adds grpc's Cython and C and uvloop's C frames, but pauses the server per sample)
and splits the server's CPU: per thread from /proc (the event-loop thread against grpc's poller thread,
grpc core's native threads and slonn's helper threads), and the event-loop thread's samples by owner:
slonn's code (servicer, dispatcher, scheduler, metrics, tensor conversion, logging, ...), grpc, the loop.
py-spy needs ptrace rights on the server (root, or kernel.yama.ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from slonn.scheduler import aio
from slonn.scheduler.serverproc import CpuMeter, ServerProcess
from slonn.scheduler.sweep import SWEEP_CLASS, labelled_inputs

# Innermost slonn file -> component (first match wins); a library frame below it can override (LIBRARIES).
COMPONENTS = (("scheduler/server.py", "servicer"), ("scheduler/dispatcher.py", "dispatcher"),
              ("scheduler/metrics.py", "metrics"), ("protos/tensors.py", "tensor conversion"),
              ("scheduler/core.py", "scheduler"), ("scheduler/queues.py", "scheduler"),
              ("scheduler/latency.py", "latency model"), ("policy/contention.py", "contention monitor"),
              ("policy/learner.py", "latency model"), ("policy/latency_model.py", "latency model"),
              ("policy/", "scheduler"), ("workers/", "worker IPC"), ("protos/", "servicer"))
LIBRARIES = (("prometheus_client", "metrics"), ("(logging/", "logging"), ("google/protobuf", "protobuf (slonn's)"),
             ("numpy", "numpy (slonn's)"))
SLONN_DIRS = ("slonn/scheduler/", "slonn/policy/", "slonn/protos/", "slonn/workers/")
GRPC_MARKS = ("grpc", "cygrpc", "absl", "tsi_", "gpr_")
LOOP_MARKS = ("asyncio/", "uvloop", "selectors.py", "epoll", "loop.c", "uv_", "uv__", "_asynciomodule.c")
# The root of every stack on the loop thread (entry point, loop runner, the loop dispatching a callback) and
# of a thread: stripped before deciding whose a sample is, so only what runs inside a callback counts.
ROOT_MARKS = ("runpy", "libc.so", "slonn/scripts/", "slonn/scheduler/aio.py", "uvloop/__init__.py",
              "asyncio/runners.py", "(asyncio/base_events.py", "(asyncio/events.py", "threading.py", "thread_run",
              "loop.c", "core.c", "object.h", "uv_", "uv__", "_asynciomodule.c", "loop-watcher.c", "queue.h")
IDLE_LEAVES = ("epoll_wait", "epoll_pwait", "poll (libc", "PyThread_acquire_lock_timed", "select (", "0x")
UNSEEN = "loop + grpc Cython, no Python frame (split with --native)"


def owner(stack: list[str]) -> str:
    """Who one sampled stack (root first) is spent for: ``slonn:<component>``, ``grpc``, ``event loop`` or
    ``other``, once the root (entry point, loop runner, thread start) is stripped. A stack with a slonn frame
    is slonn's (what it calls is its cost); else grpc's if any frame is grpc's (its Python, Cython and C
    core); else the loop's."""
    k = 0
    while k < len(stack) and any(m in stack[k] for m in ROOT_MARKS):
        k += 1
    rest = stack[k:]
    if not rest:
        return UNSEEN
    slonn_at = [i for i, f in enumerate(rest) if any(d in f for d in SLONN_DIRS)]
    if slonn_at:
        below = rest[slonn_at[-1] + 1:]
        for mark, name in LIBRARIES:
            if any(mark in f for f in below):
                return f"slonn:{name}"
        inner = rest[slonn_at[-1]]
        return "slonn:" + next((name for path, name in COMPONENTS if path in inner), "other")
    if any(m in f.lower() for f in rest for m in GRPC_MARKS):
        return "grpc"
    if any(m in f for f in rest for m in LOOP_MARKS):
        return "event loop"
    return "other"


def idle(stack: list[str]) -> bool:
    """A native sample of a thread waiting (py-spy --native counts those; its Python-only mode drops them)."""
    return bool(stack) and any(stack[-1].startswith(m) or m in stack[-1] for m in IDLE_LEAVES[:-1]) or (
        bool(stack) and stack[-1].startswith("0x") and "libc.so" in stack[-1])


def parse_raw(text: str) -> dict[str, list[tuple[list[str], int]]]:
    """py-spy ``--format raw --threads`` output -> {thread: [(frames root first, samples)]}."""
    out: dict[str, list[tuple[list[str], int]]] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread ")), "thread ?")
        frames = [f for f in frames if not f.startswith(("thread ", "process "))]
        if not idle(frames):
            out.setdefault(thread, []).append((frames, int(count)))
    return out


def split_samples(stacks: list[tuple[list[str], int]]) -> dict[str, float]:
    """Share of the samples by :func:`owner`, largest first."""
    counts: Counter = Counter()
    for frames, n in stacks:
        counts[owner(frames)] += n
    total = sum(counts.values()) or 1
    return {k: round(v / total, 4) for k, v in counts.most_common()}


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """{tid: (name, CPU seconds)} of every thread of ``pid`` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def thread_names(raw: str) -> dict[int, str]:
    """{native tid: Python thread name} from py-spy ``--threads`` output ("thread (TID): NAME" frames)."""
    out = {}
    for line in raw.splitlines():
        head = line.split(";", 1)[0]
        if head.startswith("thread (") and "): " in head:
            tid, _, name = head[len("thread ("):].partition("): ")
            if tid.isdigit():
                out[int(tid)] = name
    return out


def thread_group(tid: int, pid: int, name: str | None) -> str:
    if tid == pid:
        return "event-loop thread"
    if name is None:
        return "threads with no Python (grpc core, torch)"
    if "_poll_wrapper" in name:
        return "grpc poller thread"
    if name in ("contention-monitor", "latency-learner"):
        return "slonn monitor and learner threads"
    return "other Python threads (executors, IPC feeders)"


def thread_groups(pid: int, before: dict, after: dict, names: dict[int, str]) -> dict[str, float]:
    """CPU seconds by thread group between two :func:`thread_cpu` readings (``names``: py-spy's)."""
    groups: Counter = Counter()
    for tid, (name, cpu) in after.items():
        used = cpu - before.get(tid, (name, 0.0))[1]
        groups[thread_group(tid, pid, names.get(tid))] += max(used, 0.0)
    return dict(groups)


# -- the empty-handler server -------------------------------------------------------------------------------

async def serve_empty(event_loop: str) -> None:
    """A grpc.aio server of slonn's proto whose handlers do nothing but return a constant."""
    import grpc
    import numpy as np

    from slonn.protos import slonn_pb2 as pb
    from slonn.protos import slonn_pb2_grpc as pb_grpc
    from slonn.protos.tensors import to_tensor

    output = to_tensor(np.zeros(10, np.float32))

    class Empty(pb_grpc.InferenceServicer):
        async def Infer(self, request, context):
            return pb.InferResponse(output=output, request_id=request.request_id)

        async def InferStream(self, request_iterator, context):
            async for request in request_iterator:
                yield pb.StreamResponse(response=pb.InferResponse(output=output, request_id=request.request_id))

    server = grpc.aio.server()
    pb_grpc.add_InferenceServicer_to_server(Empty(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"slonn listening on 127.0.0.1:{port} ({event_loop})", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(grace=0.5)


class EmptyServer(ServerProcess):
    """:func:`serve_empty` in a child process, started and stopped as `slonn serve` is."""

    def __init__(self, event_loop: str, log_path: Path) -> None:
        super().__init__([], log_path, start_timeout_s=60.0)
        self.event_loop = event_loop

    def __enter__(self) -> "EmptyServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        here = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.profile_frontend", "--serve-empty",
                                      "--event-loop", self.event_loop], stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, cwd=here, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline()
        if not line.startswith("slonn listening on "):
            self.stop()
            raise RuntimeError(f"empty server did not start: {self.log_path.read_text()[-2000:]}")
        self.target = line.split()[3]
        return self


# -- the measurements ----------------------------------------------------------------------------------------

async def drive(target: str, model: str, rate: float, duration_s: float, seed: int, transport: str = "unary"):
    """The sweep's open-loop generator at one rate; returns the records."""
    from slonn.scheduler.replay import replay
    from slonn.scheduler.trace import poisson_arrivals

    arrivals = poisson_arrivals(rate, duration_s, {SWEEP_CLASS: 1.0}, seed=seed)
    return await replay(target, model, arrivals, {SWEEP_CLASS: 1000.0}, progress=False, transport=transport,
                        inputs=labelled_inputs(len(arrivals), seed=seed))


def measure(server: ServerProcess, model: str, args, seed: int, profile_to: Path | None = None) -> dict:
    """Warm up, then one measured window: CPU per call of the server and its children (and with
    ``profile_to``, py-spy's samples of the server and its per-thread CPU)."""
    aio.run(drive(server.target, model, args.rate, args.warmup_s, seed + 7919), args.event_loop)
    meter = CpuMeter(server.proc.pid)
    before, threads0 = meter.read(), thread_cpu(server.proc.pid)
    spy = None
    if profile_to is not None:
        mode = ["--native", "--rate", "50"] if args.native else ["--nonblocking", "--rate", "200"]
        spy = subprocess.Popen(["py-spy", "record", *mode, "--threads", "--format", "raw",
                                "--pid", str(server.proc.pid), "--output", str(profile_to)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    c0 = time.process_time()
    records = aio.run(drive(server.target, model, args.rate, args.duration_s, seed), args.event_loop)
    client_s = time.process_time() - c0
    use = meter.since(before)
    threads1 = thread_cpu(server.proc.pid)
    out = {"calls": len(records), "ok": sum(r.status == "OK" for r in records),
           **use.per_request_ms(len(records)), "client_cpu_ms": round(client_s / len(records) * 1e3, 4)}
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            _, err = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
        names = thread_names(profile_to.read_text()) if profile_to.exists() else {}
        groups = thread_groups(server.proc.pid, threads0, threads1, names)
        out["threads_cpu_ms"] = {k: round(v / len(records) * 1e3, 4) for k, v in groups.items()}
        out["py_spy"] = err.strip().splitlines()[-1:] if err else []
    return out


def spread(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "runs": [round(v, 4) for v in values]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_frontend", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=Path("models/digits-mlp"))
    p.add_argument("--rate", type=float, default=600.0, help="open-loop unary calls/s")
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds (0: the profile only)")
    p.add_argument("--baseline", type=Path, default=None, help="another checkout's root, served from there")
    p.add_argument("--baseline-event-loop", choices=aio.EVENT_LOOPS, default=None,
                   help="the baseline server's event loop (default: --event-loop)")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy run")
    p.add_argument("--native", action="store_true",
                   help="py-spy --native (grpc's Cython and C, uvloop's C show; pauses the server per sample, "
                        "so that run's CPU per call is not comparable)")
    p.add_argument("--event-loop", choices=aio.EVENT_LOOPS, default=aio.DEFAULT_EVENT_LOOP,
                   help="of every server and of the generator")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--serve-empty", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("serve_args", nargs="*", help="extra `slonn serve` arguments (after --)")
    args = p.parse_args(argv)
    if args.serve_empty:
        return aio.run(serve_empty(args.event_loop), args.event_loop) or 0
    if not Path("/proc/self/stat").exists():
        print("profile_frontend reads /proc: Linux only", file=sys.stderr)
        return 2
    from slonn.workers.artifact import load_manifest

    model = load_manifest(args.model_dir).name
    tmp = Path(tempfile.mkdtemp(prefix="slonn-profile-"))
    classes = tmp / "classes.toml"
    classes.write_text(f'[[class]]\nname = "{SWEEP_CLASS}"\nlatency_ms = 1000\non_late = "serve"\n')
    serve = ["--model-dir", str(args.model_dir.resolve()), "--classes", str(classes), "--event-loop",
             args.event_loop, "--stats-interval-s", "0", *args.serve_args]
    variants = {"empty": lambda: EmptyServer(args.event_loop, tmp / "empty.log"),
                "slonn": lambda: ServerProcess(serve, tmp / "slonn.log")}
    if args.baseline:
        loop = ["--event-loop", args.baseline_event_loop or args.event_loop]
        variants["baseline"] = lambda: ServerProcess([*serve, *loop], tmp / "baseline.log", cwd=args.baseline.resolve())
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for k in range(args.repeat):
        for name, make in variants.items():
            with make() as server:
                runs[name].append(measure(server, model, args, seed=k))
            print(f"round {k + 1} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    out: dict = {"rate_per_s": args.rate, "duration_s": args.duration_s, "event_loop": args.event_loop,
                 "baseline": str(args.baseline) if args.baseline else None,
                 "baseline_event_loop": args.baseline_event_loop or args.event_loop,
                 "cpus": os.cpu_count(), "model": model, "serve_args": args.serve_args,
                 "server_cpu_ms_per_call": {n: spread([r["server_cpu_ms"] for r in rs]) for n, rs in runs.items()},
                 "worker_cpu_ms_per_call": {n: spread([r["worker_cpu_ms"] for r in rs]) for n, rs in runs.items()},
                 "client_cpu_ms_per_call": {n: spread([r["client_cpu_ms"] for r in rs]) for n, rs in runs.items()}}
    if not args.no_profile:
        if shutil.which("py-spy") is None:
            out["profile"] = "py-spy not installed (pip install py-spy)"
        else:
            raw = tmp / "slonn.pyspy.txt"
            with ServerProcess(serve, tmp / "slonn-profiled.log") as server:
                got = measure(server, model, args, seed=args.repeat, profile_to=raw)
            by_thread = parse_raw(raw.read_text()) if raw.exists() else {}
            stacks = [s for ss in by_thread.values() for s in ss]
            main_thread = next((ss for t, ss in by_thread.items() if t.endswith(": MainThread")), [])
            out["profile"] = {"raw": str(raw), "run": got, "samples": sum(n for _, n in stacks),
                              "event_loop_thread_split": split_samples(main_thread),
                              "all_sampled_threads_split": split_samples(stacks)}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
