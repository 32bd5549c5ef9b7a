"""The `slonn` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module with main(argv), one-line help)
COMMANDS = {
    "serve": ("slonn.scripts.serve", "run the gRPC inference server"),
    "train": ("slonn.scripts.train", "train a plain MLP on the digits, import it, write the demo artifact"),
    "import": ("slonn.scripts.import_model", "make a trained PyTorch MLP SLO-aware with your data; write an artifact"),
    "infer": ("slonn.scripts.infer", "send one request to a server and print the answer"),
    "demo": ("slonn.scripts.demo", "train if needed, serve, replay a trace minute, print the SLO report"),
    "replay": ("slonn.scripts.replay", "open-loop trace replay against a live server"),
    "bench-kernels": ("slonn.scripts.bench_kernels", "dense vs sparse kernel latency per batch size and level"),
    "profile": ("slonn.scripts.profile", "sweep levels x batch sizes x contention; write the latency profile"),
    "simulate": ("slonn.scripts.simulate", "discrete-event replay through the real scheduler on a virtual clock"),
    "compare": ("slonn.scripts.compare", "every policy on the same trace and load: one table"),
    "reliability": ("slonn.scripts.reliability", "overload, worker kills, bad input, shutdown: every request answered"),
    "sweep": ("slonn.scripts.sweep", "open-loop Poisson load at rising rates until the server saturates: one table"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="slonn", description="SLO-aware neural-network inference server.")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND",
                   help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    p.add_argument("args", nargs=argparse.REMAINDER)
    if not argv or argv[0] in ("-h", "--help"):
        p.print_help()
        return 0
    ns = p.parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    module = importlib.import_module(COMMANDS[ns.command][0])
    return module.main(subcommand_argv(argv, ns.command)) or 0


def subcommand_argv(argv: list[str], command: str) -> list[str]:
    """What follows the command in ``argv``, verbatim: REMAINDER drops a ``--`` there, which subcommands
    that pass extra arguments on (``bench-frontend -- --precision fp32``) need."""
    return argv[argv.index(command) + 1:]


if __name__ == "__main__":
    sys.exit(main())
