"""`slonn infer`: send one held-out row (a digit by default, or a row of --inputs, or given features), or
--count rows in one call, and print the answer."""

from __future__ import annotations

import argparse
import json
import sys

import grpc
import numpy as np

from slonn.protos.client import SlonnClient, add_security_args, security_from_args
from slonn.scheduler.replay import add_inputs_args, inputs_from_args
from slonn.workers.digits import load_split


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slonn infer", description=__doc__)
    p.add_argument("--target", default="localhost:50051")
    p.add_argument("--model", default="digits-mlp")
    p.add_argument("--slo-class", default="interactive")
    p.add_argument("--index", type=int, default=0, help="which held-out row to send")
    p.add_argument("--count", type=int, default=1,
                   help="send this many held-out rows from --index in one call ([N, features], one deadline)")
    add_inputs_args(p)
    p.add_argument("--features", default=None, help="comma-separated feature values instead of a held-out row")
    p.add_argument("--budget-ms", type=float, default=0.0, help="tighter latency budget (0 = class default)")
    p.add_argument("--timeout-s", type=float, default=10.0)
    p.add_argument("--list", action="store_true", help="list models, levels and SLO classes instead")
    add_security_args(p)
    args = p.parse_args(argv)
    if args.count < 1 or (args.count > 1 and args.features):
        p.error("--count must be >= 1, and goes with held-out rows, not --features")
    rows = None if args.features else inputs_from_args(p, args)
    with SlonnClient(args.target, security_from_args(args)) as client:
        try:
            if args.list:
                from google.protobuf.json_format import MessageToDict

                print(json.dumps(MessageToDict(client.list_models()), indent=2))
                return 0
            label = None
            if args.features:
                x = np.array([float(v) for v in args.features.split(",")], np.float32)
            else:
                if rows is None:
                    split = load_split()
                    rows = split.x_test, split.y_test
                if not 0 <= args.index <= len(rows[0]) - args.count:
                    p.error(f"--index {args.index} --count {args.count}: there are {len(rows[0])} held-out rows")
                if args.count > 1:
                    sent = slice(args.index, args.index + args.count)
                    r = client.infer_many(args.model, args.slo_class, rows[0][sent],
                                          latency_budget_ms=args.budget_ms, timeout_s=args.timeout_s)
                    print(json.dumps({"request_id": r.request_id, "server_ms": round(r.server_ms, 3), "samples": [
                        {"prediction": int(np.argmax(out)), "label": int(y), **_facts(s)}
                        for out, y, s in zip(r.output, rows[1][sent], r.samples)]}, indent=2))
                    return 0
                x, label = rows[0][args.index], int(rows[1][args.index])
            r = client.infer(args.model, args.slo_class, x, latency_budget_ms=args.budget_ms,
                             timeout_s=args.timeout_s)
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(json.dumps({"prediction": int(np.argmax(r.output)), "label": label, "request_id": r.request_id,
                      **_facts(r), "server_ms": round(r.server_ms, 3)}, indent=2))
    return 0


def _facts(r) -> dict:
    """How a sample was served (an InferResult or one of its samples)."""
    return {"level": r.level, "expected_accuracy": round(r.expected_accuracy, 4), "queue_ms": round(r.queue_ms, 3),
            "exec_ms": round(r.exec_ms, 3), "predicted_ms": round(r.predicted_ms, 3), "batch_size": r.batch_size,
            "late": r.late, "kernel": r.kernel}
