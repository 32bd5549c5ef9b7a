"""`slonn replay`: open-loop trace replay against a live server; per-class summary, per-request CSV."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slonn.protos.client import add_security_args, security_from_args
from slonn.scheduler import aio
from slonn.scheduler.replay import (
    add_arrival_args,
    add_inputs_args,
    add_client_args,
    arrivals_from_args,
    inputs_from_args,
    client_kwargs,
    phase_summaries,
    replay,
    replay_with_corunner,
)
from slonn.scheduler.report import format_table, summarize, write_csv


def main(argv: list[str] | None = None) -> int:
    from slonn.scheduler.config import load_classes
    from slonn.workers.corunner import add_corunner_device_arg, corunner_device_or_exit

    p = argparse.ArgumentParser(prog="slonn replay", description=__doc__)
    p.add_argument("--target", default="localhost:50051")
    p.add_argument("--model", default="digits-mlp")
    p.add_argument("--classes", type=Path, default=None, help="SLO classes TOML (for the deadlines)")
    add_inputs_args(p)
    add_arrival_args(p)
    p.add_argument("--csv", type=Path, default=None, help="write per-request records here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--corunner-start-s", type=float, default=None, help="start a co-runner at this second")
    p.add_argument("--corunner-stop-s", type=float, default=None, help="stop it at this second")
    p.add_argument("--corunner-procs", type=int, default=1, help="co-runner busy processes (cores, or GPU shares)")
    add_corunner_device_arg(p)
    add_client_args(p)
    add_security_args(p)
    args = p.parse_args(argv)
    kwargs = {**client_kwargs(args), "security": security_from_args(args)}
    classes = load_classes(args.classes)
    arrivals = arrivals_from_args(args)
    deadlines = {n: c.latency_ms for n, c in classes.items()}
    corunner = args.corunner_start_s is not None
    burn_device = corunner_device_or_exit(p, args.corunner_device) if corunner else "cpu"
    usage: dict = {}
    inputs = inputs_from_args(p, args)
    if corunner:
        stop_s = args.corunner_stop_s if args.corunner_stop_s is not None else arrivals.duration_s
        records = aio.run(replay_with_corunner(args.target, args.model, arrivals, deadlines,
                                               args.corunner_start_s, stop_s, args.corunner_procs,
                                               usage=usage, corunner_device=burn_device, inputs=inputs, **kwargs),
                          args.event_loop)
    else:
        records = aio.run(replay(args.target, args.model, arrivals, deadlines, inputs=inputs, **kwargs),
                          args.event_loop)
    summary = summarize(records, arrivals.duration_s)
    if args.csv:
        write_csv(records, args.csv)
    if args.json:
        out = {"load": arrivals.describe(), "summary": summary}
        if corunner:
            out["phases"] = phase_summaries(records, args.corunner_start_s, stop_s, arrivals.duration_s)
            out["corunner_usage"] = usage or None
        print(json.dumps(out, indent=2))
    else:
        print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
