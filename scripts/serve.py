"""`slonn serve`: run the server until SIGTERM/SIGINT, then drain and exit 0."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, TypeVar

from slonn.policy.names import PolicyName
from slonn.precision import DEFAULT_PRECISION, PRECISIONS
from slonn.scheduler import aio
from slonn.scheduler.compiled import state as compiled_state
from slonn.scheduler.config import POOLS, ServerConfig, load_classes
from slonn.scheduler.frontends import FRONTEND_ENV, FrontendGroup, die_with_parent, identity, split_workers
from slonn.workers.placement import ask_niceness, parse_cpus, set_cpus

DEFAULT_MODEL_DIR = Path("models/digits-mlp")
T = TypeVar("T")


def spin_ms(text: str) -> float:
    """``--worker-spin-ms``: a finite number of milliseconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--worker-spin-ms {text!r}: expected milliseconds, e.g. 20") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"--worker-spin-ms {text!r}: must be finite and >= 0")
    return value


def cpus_arg(text: str) -> tuple[int, ...]:
    """``--cpus`` / ``--worker-cpus``: a CPU list such as 1, 0,2 or 0-3."""
    try:
        return parse_cpus(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def placement_problem(cpus: tuple[int, ...] | None, worker_cpus: tuple[int, ...] | None) -> str | None:
    """Why ``--cpus`` / ``--worker-cpus`` cannot be honoured here (checked on a thread of its own, before
    anything starts: a worker that cannot pin itself would only die at start-up), or None."""
    out: dict[str, str] = {}

    def probe() -> None:
        for flag, value in (("--cpus", cpus), ("--worker-cpus", worker_cpus)):
            try:
                set_cpus(value)
            except ValueError as exc:
                out["problem"] = f"{flag}: {exc}"
                return

    thread = threading.Thread(target=probe, name="placement-check")
    thread.start()
    thread.join()
    return out.get("problem")


class _AdvancedHelp(argparse.Action):
    """``--help-advanced``: the help with the advanced flags, which ``--help`` leaves out."""

    def __init__(self, option_strings, dest, hidden: list, help: str | None = None) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, help=help)
        self.hidden = hidden

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        for action, text in self.hidden:
            action.help = text
        parser.print_help()
        parser.exit()


def add_server_args(p: argparse.ArgumentParser) -> None:
    """The server's flags: what an operator sets, shown by ``--help``; and the advanced ones (placement, tuning of
    the latency learner and of gRPC, research knobs), which parse the same but only ``--help-advanced`` lists."""
    p.add_argument("--model-dir", type=Path, action="append", default=None, metavar="DIR",
                   help=f"model artifact directory (repeatable; default {DEFAULT_MODEL_DIR})")
    p.add_argument("--classes", type=Path, default=None, metavar="TOML",
                   help="SLO classes TOML (default: the packaged one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port (printed on stdout)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes")
    p.add_argument("--frontends", type=int, default=1, metavar="N",
                   help="server processes sharing the port(s) and the workers")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="torch threads per worker")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS,
                   help="worker weights; fp32 serves exact kernels only")
    p.add_argument("--max-batch", type=int, default=64, metavar="N", help="largest batch the planner forms")
    p.add_argument("--policy", default=PolicyName.SLONN.value,
                   help="slonn[:recent_tau_ms=T] | triton | fixed:LEVEL | aimd")
    p.add_argument("--max-inflight", type=int, default=8192, metavar="N",
                   help="unanswered requests beyond which: RESOURCE_EXHAUSTED")
    p.add_argument("--pool", choices=POOLS, default="process",
                   help="worker processes here, or Ray actors (pip install 'slonn[ray]')")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="--pool ray: auto (the cluster on this node) or host:port; default: start a local Ray")
    p.add_argument("--http-port", type=int, default=None, metavar="PORT",
                   help="also serve OIP over HTTP here (0: pick one)")
    p.add_argument("--grace-s", type=float, default=10.0, metavar="S", help="drain time on SIGTERM")
    p.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                   help="Prometheus metrics port (0 = off; frontend i: PORT+i)")
    p.add_argument("--stats-interval-s", type=float, default=10.0, metavar="S",
                   help="period of the stats log line (0 = off)")
    p.add_argument("--event-loop", choices=aio.EVENT_LOOPS, default=aio.DEFAULT_EVENT_LOOP,
                   help="uvloop (the default where installed: less CPU per call) or asyncio")
    hidden: list[tuple[argparse.Action, str]] = []
    p.add_argument("--help-advanced", action=_AdvancedHelp, hidden=hidden,
                   help="show this help with the advanced flags (placement, tuning, research) and exit")
    _add_advanced_args(p.add_argument_group("advanced (listed by --help-advanced only)"), hidden)


def _add_advanced_args(g: argparse._ArgumentGroup, hidden: list) -> None:
    def add(*flags: str, help: str, **kwargs) -> None:
        hidden.append((g.add_argument(*flags, help=argparse.SUPPRESS, **kwargs), help))

    add("--nice", type=int, default=0, metavar="N",
        help="add this to the server's niceness before the workers start (they inherit it unless --worker-nice is "
             "given); negative raises priority, which needs CAP_SYS_NICE (else a warning and no change)")
    add("--worker-nice", type=int, default=None, metavar="N",
        help="the workers' own niceness (absolute, -20..19; default: the server's, which they inherit). Profile "
             "at the same one (slonn profile --worker-nice)")
    add("--cpus", type=cpus_arg, default=None, metavar="LIST",
        help="CPUs the server process (its front end) may run on, e.g. 0 or 0-3 (default: any)")
    add("--worker-cpus", type=cpus_arg, default=None, metavar="LIST",
        help="CPUs the worker processes may run on (default: the server's). With --cpus on other CPUs, a "
             "co-runner on the workers' CPUs slows the model and not the front end, as a neighbour on the same "
             "GPU does (python -m bench.adapt --pin)")
    add("--in-process", action="store_true", help="run the model in the server process (debugging)")
    add("--max-pending", type=int, default=0, metavar="N",
        help="calls waiting for the event loop beyond which gRPC core sheds them (CANCELLED); 0 = gRPC's "
             "default (1000)")
    add("--max-message-bytes", type=int, default=0, metavar="N",
        help="largest request or answer message, gRPC and HTTP (>= 4096; 0 = 4 MiB, or more where a full "
             "batch of the widest model's inputs needs it)")
    add("--overhead-ms", type=float, default=1.0, metavar="MS",
        help="dispatch + IPC time added to predictions (floor of the learned per-batch overhead)")
    add("--refit-overrun-share", type=float, default=ServerConfig.refit_overrun_share, metavar="X",
        help="refit the latency table early once this share of recent batches ran over their safe prediction "
             "(0 < X <= 1; 1 = only when their mean drifts, or every 10 s)")
    add("--refit-contention-shift", type=float, default=ServerConfig.refit_contention_shift, metavar="X",
        help="refit the latency table early once the batches' contention, averaged over 2 s, moved by X "
             "(others' runnable tasks per CPU) since a refit at least 3 s old (X > 0; inf = off)")
    add("--default-class", default="", metavar="NAME",
        help="SLO class of Open Inference Protocol requests without a slo_class parameter (default: the first "
             "class in --classes)")
    add("--tls-cert", type=Path, default=None, metavar="PEM",
        help="serve gRPC and HTTP over TLS only, with this certificate (chain); with --tls-key")
    add("--tls-key", type=Path, default=None, metavar="PEM", help="the private key of --tls-cert")
    add("--tls-client-ca", type=Path, default=None, metavar="PEM",
        help="mutual TLS: require a client certificate signed by this CA, on both ports")
    add("--auth-token-file", type=Path, default=None, metavar="FILE",
        help="require 'authorization: Bearer <the file's token>' on every call (gRPC UNAUTHENTICATED, HTTP 401 "
             "without it); health and readiness checks stay open")
    add("--ray-num-cpus", type=float, default=1.0, metavar="N", help="--pool ray: CPUs each worker reserves")
    add("--ray-num-gpus", type=float, default=0.0, metavar="N", help="--pool ray: GPUs each worker reserves")
    add("--ray-strategy", default="SPREAD", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
        help="--pool ray: placement-group strategy (SPREAD: workers on as many nodes as it can)")
    add("--worker-spin-ms", type=spin_ms, default=0.0, metavar="MS",
        help="after each batch a worker polls this long for the next before blocking: on a VM it keeps the "
             "host from pausing the worker's vCPU, for a busy core while traffic flows")


def call_at_niceness(fn: Callable[[], T], value: int | None) -> tuple[T, int]:
    """``fn()`` on a thread of its own at niceness ``value`` (absolute; None: this thread's): its result and
    the niceness it ran at, or its exception.

    On Linux niceness is per thread, and the threads and processes a thread starts inherit it: a thread
    that sets its own and then ends leaves nothing to undo (going back down would need CAP_SYS_NICE), so
    processes started afterwards from this thread, e.g. the next policy's server, are not affected.
    Lowering the niceness needs CAP_SYS_NICE: without it, a warning and ``fn`` runs at the inherited one.
    """
    out: dict = {}

    def body() -> None:
        out["niceness"] = (os.getpriority(os.PRIO_PROCESS, 0) if value is None
                           else ask_niceness(value, threading.current_thread().name))
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=body, name=f"at-niceness-{value}")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["result"], out["niceness"]


def apply_nice(increment: int) -> int:
    """Add ``increment`` to this process's niceness (children started later inherit it); returns the niceness.

    An operator's knob for a server that shares its cores with other work: the serving tier ahead of
    best-effort neighbours (docs/operations.md, "CPU priority and placement"); profile the workers at the
    niceness they are served at. Raising priority needs CAP_SYS_NICE: without it the
    server runs on at its current niceness, with a warning.
    """
    now = os.getpriority(os.PRIO_PROCESS, 0)
    if not increment:
        return now
    return ask_niceness(min(max(now + increment, -20), 19), f"--nice {increment}")


def config_from_args(args) -> ServerConfig:
    return ServerConfig(
        model_dirs=tuple(args.model_dir or [DEFAULT_MODEL_DIR]), classes=load_classes(args.classes),
        host=args.host, port=args.port, workers=args.workers, threads=args.threads, device=args.device,
        worker_spin_ms=args.worker_spin_ms, worker_nice=args.worker_nice, worker_cpus=args.worker_cpus,
        precision=args.precision,
        max_batch=args.max_batch, policy=args.policy, max_inflight=args.max_inflight,
        max_pending=args.max_pending, max_message_bytes=args.max_message_bytes,
        overhead_ms=args.overhead_ms, grace_s=args.grace_s, in_process=args.in_process, pool=args.pool,
        ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus, ray_num_gpus=args.ray_num_gpus,
        ray_strategy=args.ray_strategy,
        refit_overrun_share=args.refit_overrun_share, refit_contention_shift=args.refit_contention_shift,
        metrics_port=args.metrics_port, stats_interval_s=args.stats_interval_s, http_port=args.http_port,
        default_class=args.default_class, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca, auth_token_file=args.auth_token_file)


async def run_server(cfg: ServerConfig) -> int:
    from slonn.scheduler.server import SlonnServer

    server = SlonnServer(cfg)
    port = await server.start()
    print(f"slonn listening on {cfg.host}:{port}", flush=True)
    if server.http is not None:
        print(f"slonn HTTP listening on {cfg.host}:{server.http_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    logging.info("event loop: %s.%s; niceness %d; scheduler %s", type(loop).__module__, type(loop).__name__,
                 os.nice(0), "compiled (mypyc)" if compiled_state()["compiled"] else "from Python sources")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.info("shutting down: draining for up to %.1f s", cfg.grace_s)
    unanswered = await server.stop()
    logging.info("stopped; %d queued request(s) answered UNAVAILABLE", unanswered)
    return 0


def check_security_files(cfg: ServerConfig) -> None:
    """Read the token and certificate files now (the server reads them again at its start): one that is
    unreadable, empty or not PEM is a usage error naming the flag and the file, before any process starts."""
    if cfg.auth_token_file or cfg.tls_cert:
        from slonn.scheduler import security  # grpc and aiohttp: only when they are needed

        security.load(cfg.auth_token_file, cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)


def frontends_problem(args) -> str | None:
    """Why ``--frontends`` cannot be honoured with the other flags, or None."""
    try:
        split_workers(args.workers, args.frontends)
    except ValueError as exc:
        return str(exc)
    if args.frontends > 1 and args.pool == "ray" and not args.ray_address:
        return (f"--frontends {args.frontends} with --pool ray needs --ray-address: each frontend is a Ray "
                f"driver, and without an address each would start a Ray of its own")
    return None


def as_frontend(cfg: ServerConfig) -> ServerConfig:
    """This process as one frontend of a `--frontends N` parent (it dies with the parent, its log lines
    name it), or ``cfg`` unchanged when it serves alone."""
    me = identity()
    if me is None:
        return cfg
    index, parent = me
    os.environ.pop(FRONTEND_ENV)  # not inherited by its workers: they are no frontends
    die_with_parent(parent)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s frontend-{index} %(name)s %(levelname)s %(message)s"))
    return dataclasses.replace(cfg, frontend_of=parent)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="slonn serve", description=__doc__)
    add_server_args(p)
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
        check_security_files(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"slonn serve: {exc}", file=sys.stderr)
        return 2
    problem = frontends_problem(args)
    if problem:
        print(f"slonn serve: {problem}", file=sys.stderr)
        return 2
    if cfg.pool == "ray" and importlib.util.find_spec("ray") is None:
        print("slonn serve: --pool ray needs Ray, an optional extra: pip install 'slonn[ray]' (or -e '.[ray]')",
              file=sys.stderr)
        return 2
    problem = placement_problem(args.cpus, args.worker_cpus)
    if problem:
        print(f"slonn serve: {problem}", file=sys.stderr)
        return 2
    if args.frontends > 1:
        group = FrontendGroup(argv, args.frontends, args.workers, args.host, args.port, args.http_port,
                              args.metrics_port, args.grace_s)
        try:
            return group.run()
        except OSError as exc:  # a port taken by a process that does not share it
            print(f"slonn serve: cannot bind {args.host}:{args.port} (or --http-port): {exc}", file=sys.stderr)
            return 2
    cfg = as_frontend(cfg)
    apply_nice(args.nice)
    set_cpus(args.cpus)
    return aio.run(run_server(cfg), args.event_loop)
