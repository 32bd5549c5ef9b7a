"""perf_analyzer against slonn's Open Inference Protocol endpoint, next to slonn's own replay client.

Starts `slonn serve` on loopback; for each rate, runs perf_analyzer (gRPC, Poisson arrivals at that rate,
one sample per request, perf_analyzer's random FP32 inputs) and then the replay client of `slonn replay`
(scheduler/replay.py, slonn.v1 unary calls) with Poisson arrivals at the same rate. Both send requests of
one SLO class: the server's --default-class for OIP (perf_analyzer sends no parameters) and the same class
for the replay. Prints JSON: per rate, each client's p50/p99 latency (ms) and answered rate.

    python -m bench.perf_oip --model-dir models/digits-mlp --rates 100,200 --perf-analyzer PATH

perf_analyzer is the C++ binary of Triton's client tools: it must be on PATH or given with --perf-analyzer
(docs/results.md says where this machine's came from). Extra `slonn serve` arguments go after ``--``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def run_perf_analyzer(binary: str, target: str, model: str, rate: float, window_ms: int, out_dir: Path) -> dict:
    """One perf_analyzer run at ``rate`` req/s (Poisson); its CSV row as ms and req/s."""
    report = out_dir / f"perf_{rate:g}.csv"
    # Asynchronous calls: an open loop, as the replay client's. Stability within 1000%: three windows are kept
    # whatever their spread (a shared machine's noise must not make it give up).
    cmd = [binary, "-m", model, "-u", target, "-i", "grpc", "-a", "--request-rate-range", f"{rate:g}",
           "--request-distribution", "poisson", "--measurement-interval", str(window_ms), "--max-trials", "10",
           "--stability-percentage", "1000", "--percentile", "99", "-f", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"error": f"perf_analyzer exited {proc.returncode}", "stderr": proc.stderr[-2000:],
                "stdout": proc.stdout[-2000:], "command": " ".join(cmd)}
    with open(report) as f:
        row = next(csv.DictReader(f))
    us = lambda key: round(float(row[key]) / 1e3, 3)  # noqa: E731 - perf_analyzer reports microseconds
    return {"command": " ".join(cmd), "answered_per_s": float(row["Inferences/Second"]),
            "p50_ms": us("p50 latency"), "p90_ms": us("p90 latency"), "p99_ms": us("p99 latency")}


def run_replay(target: str, model: str, slo_class: str, deadline_ms: float, rate: float, duration_s: float) -> dict:
    from slonn.scheduler.replay import replay
    from slonn.scheduler.report import summarize
    from slonn.scheduler.trace import poisson_arrivals

    arrivals = poisson_arrivals(rate, duration_s, {slo_class: 1.0}, seed=1)
    records = asyncio.run(replay(target, model, arrivals, {slo_class: deadline_ms}, progress=False))
    s = summarize(records, duration_s)["all"]
    return {"sent": s["sent"], "answered_per_s": round(s["answered_ok"] / duration_s, 2), "p50_ms": s["p50_ms"],
            "p99_ms": s["p99_ms"], "attainment": s["attainment"], "errors": s["errors"]}


def main(argv: list[str] | None = None) -> int:
    from slonn.scheduler.config import load_classes
    from slonn.scheduler.serverproc import ServerProcess
    from slonn.workers.artifact import load_manifest

    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(prog="python -m bench.perf_oip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--rates", default="100,200", help="requests/s, comma-separated")
    p.add_argument("--duration-s", type=float, default=20.0, help="replay length per rate")
    p.add_argument("--window-ms", type=int, default=10000, help="perf_analyzer's measurement window")
    p.add_argument("--slo-class", default="standard", help="the class both clients' requests belong to")
    p.add_argument("--classes", type=Path, default=None, help="SLO classes TOML (default: the packaged one)")
    p.add_argument("--perf-analyzer", default=shutil.which("perf_analyzer"), help="the perf_analyzer binary")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not args.perf_analyzer:
        p.error("perf_analyzer not found: put it on PATH or pass --perf-analyzer")
    model = load_manifest(args.model_dir).name
    slo_class = load_classes(args.classes).get(args.slo_class)
    if slo_class is None:
        p.error(f"--slo-class {args.slo_class!r} is not in the classes file")
    serve = ["--model-dir", str(args.model_dir), "--default-class", args.slo_class, "--stats-interval-s", "0",
             *(["--classes", str(args.classes)] if args.classes else []), *extra]
    results = []
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(serve, Path(tmp) / "serve.log") as srv:
        for rate in (float(r) for r in args.rates.split(",")):
            results.append({"rate_per_s": rate,
                            "perf_analyzer": run_perf_analyzer(args.perf_analyzer, srv.target, model, rate,
                                                               args.window_ms, Path(tmp)),
                            "slonn_replay": run_replay(srv.target, model, args.slo_class, slo_class.latency_ms,
                                                       rate, args.duration_s)})
    print(json.dumps({"model": model, "slo_class": args.slo_class, "serve_args": serve, "results": results},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
