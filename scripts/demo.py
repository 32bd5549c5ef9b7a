"""`slonn demo`: the main job on a fresh machine.

Trains the default model if there is none, starts the server on localhost,
replays the first minute of the Azure trace time-compressed with held-out
digits as inputs, prints the per-class SLO report, and shuts everything down.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from slonn.scheduler.config import load_classes
from slonn.scheduler import aio
from slonn.scheduler.replay import add_arrival_args, add_client_args, arrivals_from_args, client_kwargs, replay
from slonn.scheduler.report import format_table, summarize, write_csv
from slonn.scheduler.serverproc import ServerProcess
from slonn.workers.train import TrainConfig, train_to
from slonn.workers.artifact import is_artifact, load_heldout, load_manifest


def ensure_model(model_dir: Path) -> None:
    if is_artifact(model_dir):
        return
    print(f"no model at {model_dir}: training the default 3x4096 SLO-aware MLP on the digits "
          f"(3-4 minutes on 2 CPU cores)...", flush=True)
    t0 = time.monotonic()
    manifest = train_to(model_dir, TrainConfig())
    print(f"trained in {time.monotonic() - t0:.0f} s; held-out accuracy per level: "
          f"{ {f'{k:g}': round(v, 4) for k, v in manifest.accuracy.items()} }", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slonn demo", description=__doc__)
    p.add_argument("--model-dir", type=Path, default=Path("models/digits-mlp"))
    p.add_argument("--classes", type=Path, default=None)
    p.add_argument("--policy", default="slonn")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the CSV, JSON and server log go")
    add_arrival_args(p)
    add_client_args(p)
    # One stream per client, as the documented comparisons run (`--transport stream`, docs/simulator.md).
    # One unary call per request costs ~7 ms more per round trip at this load on a 2-vCPU VM (interactive
    # 77-92% in time, p50 9-17 ms, against 100% and 4-5 ms on a stream; docs/results.md); `--transport
    # unary` shows it.
    p.set_defaults(transport="stream")
    args = p.parse_args(argv)
    ensure_model(args.model_dir)
    manifest = load_manifest(args.model_dir)
    classes = load_classes(args.classes)
    arrivals = arrivals_from_args(args)
    serve_args = ["--model-dir", str(args.model_dir), "--policy", args.policy, "--event-loop", args.event_loop]
    if args.classes:
        serve_args += ["--classes", str(args.classes)]
    print("starting the server (workers calibrate kernels and profile latency first)...", flush=True)
    with ServerProcess(serve_args, args.out / "server.log") as server:
        print(f"server at {server.target}; replaying {len(arrivals)} requests of {arrivals.source} "
              f"(trace seconds {arrivals.window_s[0]:g}-{arrivals.window_s[1]:g}, x{arrivals.speedup:g} "
              f"-> {arrivals.duration_s:.1f} s, {args.transport} gRPC)", flush=True)
        records = aio.run(replay(server.target, manifest.name, arrivals,
                                 {n: c.latency_ms for n, c in classes.items()}, inputs=load_heldout(args.model_dir),
                                 **client_kwargs(args)), args.event_loop)
    summary = summarize(records, arrivals.duration_s)
    write_csv(records, args.out / "requests.csv")
    report = {"load": arrivals.describe(), "policy": args.policy, "transport": args.transport,
              "classes": {n: {"latency_ms": c.latency_ms, "min_accuracy": c.min_accuracy} for n, c in classes.items()},
              "model_accuracy": {f"{k:g}": v for k, v in manifest.accuracy.items()},
              "summary": summary, "server_exit_code": server.returncode}
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(format_table(summary))
    print(f"\nserver exit code {server.returncode}; per-request CSV {args.out / 'requests.csv'}; "
          f"JSON {args.out / 'report.json'}")
    return 0 if server.returncode == 0 else 1
