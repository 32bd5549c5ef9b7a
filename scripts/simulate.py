"""`slonn simulate`: discrete-event replay of a trace through the real scheduler on a virtual clock."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from slonn.scheduler.simulator import load, run_policy, sim_parser


def main(argv: list[str] | None = None) -> int:
    from slonn.scheduler.compiled import state as compiled_state
    from slonn.scheduler.replay import phase_summaries
    from slonn.scheduler.report import format_table, summarize, write_csv

    # A literal, not __doc__: mypyc drops module docstrings (scheduler/compiled.py).
    p = sim_parser(prog="slonn simulate",
                   description="Discrete-event replay of a trace through the real scheduler on a virtual clock.")
    p.add_argument("--policy", default="slonn", help="slonn[:recent_tau_ms=T] | triton[:k=v,...] | fixed:<level> | aimd")
    p.add_argument("--csv", type=Path, default=None, help="write per-request records here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    arrivals, setup, cfg = load(args)
    result = run_policy(setup, arrivals, args.policy, cfg, args.seed)
    summary = summarize(result.records, arrivals.duration_s)
    if args.csv:
        write_csv(result.records, args.csv)
    sim = {"requests": len(result.records), "batches": result.batches, "wall_s": round(result.wall_s, 3),
           "cpu_s": round(result.cpu_s, 3), "simulated_requests_per_s": round(result.requests_per_s),
           "simulated_requests_per_cpu_s": round(result.requests_per_cpu_s), "virtual_s": round(result.sim_s, 3),
           "planner_table": args.planner_table, "contention": asdict(setup.contention),
           "compiled": compiled_state()["compiled"]}
    out = {"load": arrivals.describe(), "policy": args.policy, "summary": summary, "sim": sim}
    if args.corunner_start_s is not None:
        out["phases"] = phase_summaries(result.records, args.corunner_start_s, args.corunner_stop_s,
                                        arrivals.duration_s)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(format_table(summary))
        print(f"\n{len(result.records)} requests in {result.wall_s:.3f} s wall: "
              f"{result.requests_per_s:,.0f} simulated requests/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
