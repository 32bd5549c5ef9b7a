"""`slonn sweep`: open-loop Poisson load at a list of rates, per transport, until the server saturates.

Starts `slonn serve` on loopback with one SLO class (``--deadline-ms``, late answers served by default so
the latency tail is seen) unless ``--target`` names a running server. Prints a table (rate, achieved, p50,
p99, share within the deadline, server / worker / generator CPU per request) and writes JSON with
``--json``. The multi-sample transports (``multi``, ``multi-stream``) send ``--samples-per-call`` samples per
call: rates and CPU are then per sample, with calls/s and the server's CPU per call beside them. Extra `slonn serve` arguments go after ``--``; the generator shares the machine with the server,
so on a small machine its CPU bounds the rates too (its column says how much).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from slonn.protos.client import add_security_args, security_from_args
from slonn.scheduler import aio
from slonn.scheduler.replay import TRANSPORTS
from slonn.scheduler.serverproc import CpuMeter, ServerProcess
from slonn.scheduler.sweep import SWEEP_CLASS, SaturationRule, format_sweep_table, max_sustained, sweep_transport


def _rates(text: str) -> list[float]:
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(r <= 0 for r in rates) or rates != sorted(rates):
        raise argparse.ArgumentTypeError(f"{text!r}: ascending rates > 0, comma-separated")
    return rates


def _transports(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in TRANSPORTS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated, each one of {TRANSPORTS}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="slonn sweep", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=Path("models/digits-mlp"), help="artifact to serve")
    p.add_argument("--target", default=None, help="sweep this running server instead (no CPU columns "
                                                  "unless --server-pid); it must serve the class 'sweep'")
    p.add_argument("--server-pid", type=int, default=None, help="with --target: its pid, for the CPU columns")
    p.add_argument("--model", default=None, help="model name (default: the artifact's)")
    p.add_argument("--policy", default="slonn", help="`slonn serve --policy` of the started server")
    p.add_argument("--rates", type=_rates, default=_rates("200,400,800,1200,1600,2000,2400"),
                   help="ascending requests (samples)/s, comma-separated")
    p.add_argument("--transports", type=_transports, default=["unary", "stream"], help=f"of {TRANSPORTS}")
    p.add_argument("--samples-per-call", type=int, default=8,
                   help="samples per call on the multi transports (at most the server's --max-batch)")
    p.add_argument("--duration-s", type=float, default=10.0, help="seconds of load per rate")
    p.add_argument("--warmup-s", type=float, default=2.0, help="unreported load at the first rate, per transport")
    p.add_argument("--deadline-ms", type=float, default=50.0)
    p.add_argument("--on-late", choices=("serve", "reject"), default="serve", help="the class's on_late")
    p.add_argument("--min-accuracy", type=float, default=0.0, help="the class's accuracy floor")
    p.add_argument("--min-achieved", type=float, default=0.95, help="saturated below this share of offered")
    p.add_argument("--stop-after", type=int, default=2, help="stop after this many saturated rates in a row")
    p.add_argument("--client-deadline", choices=("generous", "class"), default="generous",
                   help="unary calls' gRPC deadline (generous: every late answer is received and measured)")
    p.add_argument("--channels", type=int, default=1, metavar="K",
                   help="client channels, each on its own connection (and stream): a server with --frontends N "
                        "spreads connections, not requests")
    p.add_argument("--event-loop", choices=aio.EVENT_LOOPS, default=aio.DEFAULT_EVENT_LOOP,
                   help="of this generator and of the started server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the rows and settings here")
    p.add_argument("--log", type=Path, default=None, help="the started server's log (default: a temp file)")
    p.add_argument("serve_args", nargs="*", help="extra `slonn serve` arguments (after --)")
    add_security_args(p)  # for --target
    args = p.parse_args(argv)
    if args.duration_s <= 0 or args.deadline_ms <= 0:
        p.error("--duration-s and --deadline-ms must be > 0")
    if args.channels < 1:
        p.error("--channels must be >= 1")
    if args.samples_per_call < 1:
        p.error("--samples-per-call must be >= 1")
    if args.server_pid is not None and args.target is None:
        p.error("--server-pid goes with --target")
    return args


async def _sweep(args, target: str, model: str, meter: CpuMeter | None) -> dict:
    rule = SaturationRule(args.min_achieved, args.stop_after)
    out = {}
    for transport in args.transports:
        points = await sweep_transport(
            target, model, transport, args.rates, args.duration_s, args.deadline_ms, meter, rule,
            warmup_s=args.warmup_s, seed=args.seed, client_deadline=args.client_deadline == "class",
            security=security_from_args(args) if args.target else None,
            samples_per_call=args.samples_per_call,
            on_point=lambda pt: print(format_sweep_table([pt]).splitlines()[-1], file=sys.stderr, flush=True),
            channels=args.channels)
        out[transport] = points
    return out


def main(argv: list[str] | None = None) -> int:
    from slonn.workers.artifact import load_manifest

    args = parse_args(argv)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
    model = args.model or load_manifest(args.model_dir).name
    if args.target:
        meter = CpuMeter(args.server_pid) if args.server_pid else None
        by_transport = aio.run(_sweep(args, args.target, model, meter), args.event_loop)
    else:
        with tempfile.TemporaryDirectory(prefix="slonn-sweep-") as tmp:
            classes = Path(tmp) / "classes.toml"
            classes.write_text(f'[[class]]\nname = "{SWEEP_CLASS}"\nlatency_ms = {args.deadline_ms}\n'
                               f'min_accuracy = {args.min_accuracy}\non_late = "{args.on_late}"\n')
            serve = ["--model-dir", str(args.model_dir), "--classes", str(classes), "--policy", args.policy,
                     "--event-loop", args.event_loop, *args.serve_args]
            with ServerProcess(serve, args.log or Path(tmp) / "serve.log") as server:
                by_transport = aio.run(_sweep(args, server.target, model, CpuMeter(server.proc.pid)),
                                       args.event_loop)
    rows = [p for points in by_transport.values() for p in points]
    print(format_sweep_table(rows))
    sustained = {t: max_sustained(points) for t, points in by_transport.items()}
    print("max sustained rate/s: " + ", ".join(f"{t} {r if r is not None else '-'}" for t, r in sustained.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": settings, "model": model, "points": rows,
                                         "max_sustained_per_s": sustained}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
