"""`python -m scripts.bench_sim`: simulated requests per second of wall time, compiled against the sources.

Each round runs one child process per mode, alternating which goes first: ``SLONN_COMPILED=1`` (the mypyc
extensions, if built) and ``SLONN_COMPILED=0`` (the same modules from their Python sources). A child
loads the model, the profile and the trace once (``slonn simulate``'s setup), then times ``--reps``
simulations of the whole load, each with a different seed for the latency noise, and prints the rates.
The JSON has every rate, the median per mode and the ratio of the medians (same machine, same minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _child(args: argparse.Namespace, rest: list[str]) -> int:
    from scheduler import compiled
    from scripts.replay import add_arrival_args, arrivals_from_args
    from scripts.simulate import add_sim_args, build_setup, run_policy, sim_config

    p = argparse.ArgumentParser()
    add_arrival_args(p)
    add_sim_args(p)
    sim_args = p.parse_args(rest)
    arrivals = arrivals_from_args(sim_args)
    setup = build_setup(sim_args)
    cfg = sim_config(sim_args)
    rates, cpu_rates = [], []
    for rep in range(args.reps):
        res = run_policy(setup, arrivals, args.policy, cfg, seed=rep)
        rates.append(round(res.requests_per_s))
        cpu_rates.append(round(res.requests_per_cpu_s))
    print(json.dumps({"compiled": compiled.state()["compiled"], "requests": len(res.records),
                      "rates": rates, "cpu_rates": cpu_rates}))
    return 0


def _run_child(mode: str, argv: list[str]) -> dict:
    env = dict(os.environ, SLONN_COMPILED=mode)
    out = subprocess.run([sys.executable, "-m", "scripts.bench_sim", "--child", *argv], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bench_sim child (SLONN_COMPILED={mode}) failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m scripts.bench_sim", description=__doc__.splitlines()[0],
                                epilog="Other arguments go to the simulation (as for `slonn simulate`); "
                                       "the default load is the compare load, --duration-s 1200 --speedup 20.41.")
    p.add_argument("--rounds", type=int, default=3, help="child pairs (compiled, sources), alternating the order")
    p.add_argument("--reps", type=int, default=10, help="timed simulations per child")
    p.add_argument("--policy", default="slonn")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if not any(a.startswith(("--duration-s", "--speedup", "--rate")) for a in rest):
        rest = ["--duration-s", "1200", "--speedup", "20.41", *rest]
    if args.child:
        return _child(args, rest)
    passthrough = ["--reps", str(args.reps), "--policy", args.policy, *rest]
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
