"""The frontend wall, simulated: the highest Poisson rate each policy sustains (p99 <= the deadline) when the
frontend (one event-loop thread) pays a CPU cost per request and per batch.

Deterministic (virtual clock, seeded draws): the machine's load does not change the figures. The model is a
synthetic four-level MLP table shaped like a 64-2048-2048-10 MLP on a 2-vCPU VM (exec = fixed + per sample x
batch x level, with 10% noise; safe bound = 1.3 x mean), one worker, one 50 ms class that serves late answers,
as in the live measurement of dense batching against levels. Policies: ``triton`` (dense dynamic batching),
``slonn:frontend=0`` (levels, planned by model latency alone) and ``slonn`` (levels, planning for the
frontend's cost too).

    python -m bench.frontend_wall                    # the table in docs/results.md
    python -m bench.frontend_wall --frontend off     # the same without the frontend model: no wall
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from slonn.policy.factory import make_policy
from slonn.policy.table import LatencyTable
from slonn.scheduler.config import SLOClassConfig
from slonn.scheduler.driver import FRONTEND_BATCH_MS, FRONTEND_REQUEST_MS
from slonn.scheduler.simulator import LatencyDraw, SimConfig, simulate
from slonn.scheduler.trace import poisson_arrivals

LEVELS = (1.0, 0.5, 0.25, 0.1)
ACCURACY = (0.975, 0.972, 0.968, 0.955)
POLICIES = ("triton", "slonn:frontend=0", "slonn")
CLASS = "wall"


def table(max_batch: int, fixed_ms: float, per_sample_ms: float) -> LatencyTable:
    mean = LatencyTable.constant(LEVELS, max_batch, per_item_ms=per_sample_ms, fixed_ms=fixed_ms)
    return LatencyTable(LEVELS, max_batch, (), 1.3 * mean.mean_ms, mean.mean_ms.copy())


def run(policy: str, rate: float, args: argparse.Namespace) -> dict:
    t = table(args.max_batch, args.fixed_ms, args.per_sample_ms)
    ratios = np.random.default_rng(args.seed).lognormal(0.0, 0.1, 4096)
    draw = LatencyDraw({0.0: t.mean_ms[0]}, {0.0: ratios})
    classes = {CLASS: SLOClassConfig(CLASS, args.deadline_ms, 0.0, 1, 1 << 20, "serve")}
    on = args.frontend == "on"
    cfg = SimConfig(workers=1, max_batch=args.max_batch, overhead_ms=1.0, dispatch_ms=args.dispatch_ms,
                    reply_ms_per_request=0.0, frontend_request_ms=args.frontend_request_ms if on else 0.0,
                    frontend_batch_ms=args.frontend_batch_ms if on else 0.0, max_inflight=1 << 20)
    arrivals = poisson_arrivals(rate, args.duration_s, {CLASS: 1.0}, seed=args.seed)
    res = simulate(arrivals, classes, make_policy(policy), t, ACCURACY, draw, cfg, seed=args.seed)
    ok = [r for r in res.records if r.status == "OK"]
    lat = np.asarray([(r.answer_s - r.send_s) * 1e3 for r in res.records if r.status == "OK"])
    p99 = float(np.percentile(lat, 99)) if len(lat) else float("inf")
    acc = {lv: a for lv, a in zip(LEVELS, ACCURACY)}
    return {"policy": policy, "rate": rate, "answered": len(ok) / max(len(res.records), 1), "p99_ms": p99,
            "mean_batch": float(np.mean([r.batch_size for r in ok])) if ok else 0.0,
            "accuracy": float(np.mean([acc[r.level] for r in ok])) if ok else 0.0,
            "sustained": len(ok) == len(res.records) and p99 <= args.deadline_ms}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="400,800,1000,1200,1300,1400,1500,1600,1700",
                   help="comma-separated offered rates (req/s)")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--duration-s", type=float, default=20.0)
    p.add_argument("--deadline-ms", type=float, default=50.0)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--fixed-ms", type=float, default=0.15, help="exec ms of a batch beyond its samples")
    p.add_argument("--per-sample-ms", type=float, default=0.15, help="exec ms per sample at level 1.0")
    p.add_argument("--dispatch-ms", type=float, default=0.3, help="IPC latency per batch beyond the frontend's CPU")
    p.add_argument("--frontend", choices=("on", "off"), default="on")
    p.add_argument("--frontend-request-ms", type=float, default=FRONTEND_REQUEST_MS)
    p.add_argument("--frontend-batch-ms", type=float, default=FRONTEND_BATCH_MS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON line per run instead of the tables")
    args = p.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    policies = args.policies.split(",")
    rows = [run(pol, rate, args) for rate in rates for pol in policies]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"frontend {args.frontend}: {args.frontend_request_ms} ms/request, {args.frontend_batch_ms} ms/batch; "
          f"{args.deadline_ms:g} ms class; p99 ms / mean batch per rate")
    print("| rate | " + " | ".join(policies) + " |")
    print("|---" * (len(policies) + 1) + "|")
    for rate in rates:
        cells = []
        for pol in policies:
            r = next(x for x in rows if x["policy"] == pol and x["rate"] == rate)
            mark = "" if r["sustained"] else " (fails)"
            cells.append(f"{r['p99_ms']:.1f} / {r['mean_batch']:.1f}{mark}")
        print(f"| {rate:g} | " + " | ".join(cells) + " |")
    print("\n| policy | highest rate sustained (p99 <= deadline, every request answered) | accuracy there |")
    print("|---|---|---|")
    for pol in policies:
        ok = [x for x in rows if x["policy"] == pol and x["sustained"]]
        best = max(ok, key=lambda x: x["rate"]) if ok else None
        print(f"| {pol} | {best['rate']:g} | {best['accuracy']:.3f} |" if best else f"| {pol} | none | - |")


if __name__ == "__main__":
    main()
