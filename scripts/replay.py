"""`slonn replay`: open-loop trace replay against a live server over gRPC.

Open loop: each request is sent at its trace time whatever the server is
doing (a slow server never slows the sender). Inputs are held-out digits;
answers are checked against their labels.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from protos.client import AsyncSlonnClient, InferResult
from scripts.digits import load_split
from scripts.report import RequestRecord, format_table, summarize, write_csv
from scripts.trace import DEFAULT_TRACE, Arrivals, make_arrivals

CLIENT_TIMEOUT = "CLIENT_TIMEOUT"
"""Status of a request the server never answered before the client's generous deadline."""


def _progress(done: int, total: int, started: float, stream) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} sent  {time.monotonic() - started:5.1f}s")
    stream.flush()


async def replay(target: str, model: str, arrivals: Arrivals, deadlines_ms: dict[str, float],
                 split_seed: int = 0, timeout_factor: float = 4.0, progress: bool = True) -> list[RequestRecord]:
    """Send every arrival at its time; returns one record per request (each with a terminal status)."""
    split = load_split(seed=split_seed)
    x, y = split.x_test, split.y_test
    records = [RequestRecord(i, c, deadlines_ms[c], 0.0) for i, c in enumerate(arrivals.classes)]
    async with AsyncSlonnClient(target) as client:
        await client.wait_ready()
        loop_t0 = time.monotonic()

        async def one(i: int) -> None:
            rec = records[i]
            rec.send_s = time.monotonic() - loop_t0
            k = i % len(x)
            # The call's deadline is generous: the server answers DEADLINE_EXCEEDED itself, early.
            timeout = rec.deadline_ms * 1e-3 * timeout_factor + 1.0
            try:
                res: InferResult = await client.infer(model, rec.slo_class, x[k], request_id=str(i),
                                                      timeout_s=timeout)
            except grpc.aio.AioRpcError as exc:
                # The client's own deadline firing means the server never answered.
                client_timeout = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and exc.details() == "Deadline Exceeded"
                rec.status = CLIENT_TIMEOUT if client_timeout else exc.code().name
            else:
                rec.status = "OK"
                rec.level, rec.batch_size, rec.late = res.level, res.batch_size, res.late
                rec.exec_ms, rec.predicted_ms = res.exec_ms, res.predicted_ms
                rec.correct = bool(int(np.argmax(res.output)) == int(y[k]))
            rec.answer_s = time.monotonic() - loop_t0

        tasks = []
        for i, offset in enumerate(arrivals.offsets_s):
            delay = offset - (time.monotonic() - loop_t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
            if progress and i % 50 == 0:
                _progress(i, len(arrivals), loop_t0, sys.stderr)
        if progress:
            _progress(len(arrivals), len(arrivals), loop_t0, sys.stderr)
            sys.stderr.write("\n")
        await asyncio.gather(*tasks)
    return records


def add_arrival_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="arrival trace CSV (TIMESTAMP column)")
    p.add_argument("--start-s", type=float, default=0.0, help="window start in trace seconds")
    p.add_argument("--duration-s", type=float, default=60.0, help="window length in trace seconds")
    p.add_argument("--speedup", type=float, default=10.0, help="time compression factor")
    p.add_argument("--rate", type=float, default=None, help="target mean requests/s (overrides --speedup)")


def arrivals_from_args(args) -> Arrivals:
    return make_arrivals(args.trace, args.start_s, args.duration_s, args.speedup, args.rate)


def main(argv: list[str] | None = None) -> int:
    from scheduler.config import load_classes

    p = argparse.ArgumentParser(prog="slonn replay", description=__doc__)
    p.add_argument("--target", default="localhost:50051")
    p.add_argument("--model", default="digits-mlp")
    p.add_argument("--classes", type=Path, default=None, help="SLO classes TOML (for the deadlines)")
    add_arrival_args(p)
    p.add_argument("--csv", type=Path, default=None, help="write per-request records here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    classes = load_classes(args.classes)
    arrivals = arrivals_from_args(args)
    records = asyncio.run(replay(args.target, args.model, arrivals,
                                 {n: c.latency_ms for n, c in classes.items()}))
    summary = summarize(records, arrivals.duration_s)
    if args.csv:
        write_csv(records, args.csv)
    if args.json:
        print(json.dumps({"load": arrivals.describe(), "summary": summary}, indent=2))
    else:
        print(format_table(summary))
    return 0
