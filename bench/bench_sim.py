"""`python -m bench.bench_sim`: simulated requests per second of wall time, compiled against the sources.

Each round runs one child process per mode, alternating which goes first: ``SLONN_COMPILED=1`` (the mypyc
extensions, if built) and ``SLONN_COMPILED=0`` (the same modules from their Python sources). A child
loads the model, the profile and the trace once (``slonn simulate``'s setup), then times ``--reps``
simulations of the whole load, each with a different seed for the latency noise, and prints the rates.
The JSON has every rate, the median per mode and the ratio of the medians (same machine, same minutes).

``--against DIR`` compares this checkout with another one (say a worktree of an older commit, built with
``python setup.py build_ext --inplace``) instead: both run compiled, at the same time, one child per vCPU,
and swap vCPUs every pair. On a shared host the speed changes from minute to minute by more than most
changes to the code, so only runs side by side compare; the JSON has each pair's ratio and their median.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _child(args: argparse.Namespace, rest: list[str]) -> int:
    from slonn.scheduler import compiled
    from slonn.scheduler.simulator import load, run_policy, sim_parser

    arrivals, setup, cfg = load(sim_parser().parse_args(rest))
    rates, cpu_rates = [], []
    for rep in range(args.reps):
        res = run_policy(setup, arrivals, args.policy, cfg, seed=rep)
        rates.append(round(res.requests_per_s))
        cpu_rates.append(round(res.requests_per_cpu_s))
    st = compiled.state()
    print(json.dumps({"compiled": st["compiled"], "reason": st["reason"], "root": str(compiled.ROOT),
                      "requests": len(res.records), "rates": rates, "cpu_rates": cpu_rates}))
    return 0


def _child_cmd(argv: list[str], cpu: int | None = None) -> list[str]:
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    return [*pin, sys.executable, "-m", "bench.bench_sim", "--child", *argv]


def _result(out: str, err: str, returncode: int, what: str) -> dict:
    if returncode != 0:
        raise SystemExit(f"bench_sim child ({what}) failed:\n{err}")
    return json.loads(out.strip().splitlines()[-1])


def _run_child(mode: str, argv: list[str]) -> dict:
    env = dict(os.environ, SLONN_COMPILED=mode)
    out = subprocess.run(_child_cmd(argv), env=env, capture_output=True, text=True, check=False)
    return _result(out.stdout, out.stderr, out.returncode, f"SLONN_COMPILED={mode}")


def pinned_inputs(argv: list[str]) -> list[str]:
    """``argv`` with every input file made absolute, as this checkout resolves it (its model, trace, classes
    and profile): each side runs in its own checkout, and must read the same files."""
    from slonn.scheduler.config import default_classes_path
    from slonn.scheduler.simulator import sim_parser

    known, _ = sim_parser(add_help=False).parse_known_args(argv)
    pinned = ["--model-dir", str(known.model_dir.resolve()), "--trace", str(known.trace.resolve()),
              "--classes", str((known.classes or default_classes_path()).resolve())]
    if known.profile is not None:
        pinned += ["--profile", str(known.profile.resolve())]
    return [*argv, *pinned]  # argparse keeps the last of a repeated option


def side_by_side(other: Path, pairs: int, argv: list[str]) -> dict:
    """This checkout and ``other`` at once, one pinned child each (``python -m`` imports from the child's
    working directory; each child reports where its code came from, and it is checked), swapping vCPUs every
    pair. Both must run compiled, on the same requests."""
    from slonn.scheduler import compiled

    dirs = {"this": compiled.ROOT, "other": other.resolve()}
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        raise SystemExit("bench_sim --against needs two CPUs")
    if shutil.which("taskset") is None:
        raise SystemExit("bench_sim --against pins its children with taskset (util-linux), which is not installed")
    argv = pinned_inputs(argv)
    env = dict(os.environ, SLONN_COMPILED="1")
    runs: list[dict] = []
    for k in range(pairs):
        procs = {name: subprocess.Popen(_child_cmd(argv, cpus[(i + k) % 2]), cwd=d, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for i, (name, d) in enumerate(dirs.items())}
        got = {}
        for name, proc in procs.items():
            out, err = proc.communicate()
            got[name] = _result(out, err, proc.returncode, f"in {dirs[name]}")
            root = got[name].get("root")  # a checkout from before this option reports neither root nor reason
            if root is not None and Path(root) != dirs[name]:
                raise SystemExit(f"bench_sim --against: the child in {dirs[name]} ran the code in {root} "
                                 f"(PYTHONSAFEPATH set?)")
            if not got[name]["compiled"]:
                raise SystemExit(f"bench_sim --against: {dirs[name]} ran its Python sources "
                                 f"({got[name].get('reason', 'no reason reported')}); build it there: "
                                 f"python setup.py build_ext --inplace")
            got[name]["median"] = statistics.median(got[name]["rates"])
        if got["this"]["requests"] != got["other"]["requests"]:
            raise SystemExit(f"bench_sim --against: the two sides simulated {got['this']['requests']} and "
                             f"{got['other']['requests']} requests")
        got["ratio"] = round(got["this"]["median"] / got["other"]["median"], 3)
        runs.append(got)
    return {"this": str(dirs["this"]), "other": str(dirs["other"]),
            "roots_checked": {name: all("root" in r[name] for r in runs) for name in dirs},
            "this_medians": [r["this"]["median"] for r in runs], "other_medians": [r["other"]["median"] for r in runs],
            "ratios": [r["ratio"] for r in runs], "median_ratio": statistics.median(r["ratio"] for r in runs)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.bench_sim", description=__doc__.splitlines()[0],
                                epilog="Other arguments go to the simulation (as for `slonn simulate`); "
                                       "the default load is the compare load, --duration-s 1200 --speedup 20.41.")
    p.add_argument("--rounds", type=int, default=3,
                   help="child pairs (compiled, sources), alternating the order; with --against, side-by-side pairs")
    p.add_argument("--reps", type=int, default=10, help="timed simulations per child")
    p.add_argument("--policy", default="slonn")
    p.add_argument("--against", type=Path, default=None, metavar="DIR",
                   help="compare with the checkout in DIR instead: both compiled, side by side, one per vCPU")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if not any(a.startswith(("--duration-s", "--speedup", "--rate")) for a in rest):
        rest = ["--duration-s", "1200", "--speedup", "20.41", *rest]
    if args.child:
        return _child(args, rest)
    passthrough = ["--reps", str(args.reps), "--policy", args.policy, *rest]
    if args.against is not None:
        out = {"policy": args.policy, "simulation_args": rest, "reps": args.reps,
               **side_by_side(args.against, args.rounds, passthrough)}
        print(json.dumps(out, indent=2))
        return 0
    runs: dict[str, list[dict]] = {"compiled": [], "sources": []}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        order = ("1", "0") if r % 2 == 0 else ("0", "1")
        for mode in order:
            runs["compiled" if mode == "1" else "sources"].append(_run_child(mode, passthrough))
    if not all(run["compiled"] for run in runs["compiled"]):
        print("bench_sim: the mypyc extensions are not built or not current: both modes ran the sources "
              "(pip install -e . builds them)", file=sys.stderr)
    out: dict = {"policy": args.policy, "simulation_args": rest, "rounds": args.rounds, "reps": args.reps,
                 "requests_per_run": runs["sources"][0]["requests"], "wall_s": round(time.perf_counter() - t0, 1)}
    for mode, rs in runs.items():
        rates = [x for run in rs for x in run["rates"]]
        cpu = [x for run in rs for x in run["cpu_rates"]]
        out[mode] = {"loaded_compiled": all(run["compiled"] for run in rs), "median_requests_per_s": statistics.median(rates),
                     "min": min(rates), "max": max(rates), "median_requests_per_cpu_s": statistics.median(cpu),
                     "per_child_median": [statistics.median(run["rates"]) for run in rs]}
    out["speedup_median"] = round(out["compiled"]["median_requests_per_s"] / out["sources"]["median_requests_per_s"], 2)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
