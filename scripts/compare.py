"""`slonn compare`: every policy on the same trace and load, one table (JSON + Markdown) and plots.

Simulated (``--sim``: the real scheduler on a virtual clock, slonn.scheduler.simulator)
and/or live (``--live``: a fresh ``slonn serve --policy NAME`` per policy,
open-loop gRPC replay). ``--corunner`` turns a co-runner on for the middle
third of the replay (live: ``workers.corunner.make_burner``, CPU-burning
processes, or GPU-burning ones with ``--corunner-device cuda`` or on a GPU
machine; simulated: the profile's contention at that intensity).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from slonn.scheduler.compiled import state as compiled_state
from slonn.scheduler.report import RequestRecord, summarize, write_csv
from slonn.scheduler.trace import Arrivals

DEFAULT_POLICIES = ("slonn", "triton", "fixed:0.1", "aimd")


def live_serve_args(args: argparse.Namespace, policy: str) -> list[str]:
    """`slonn serve` arguments of the live server for ``policy``: the same settings the simulator models."""
    out = ["--model-dir", str(args.model_dir), "--policy", policy, "--workers", str(args.workers),
           "--max-batch", str(args.max_batch), "--overhead-ms", str(args.overhead_ms)]
    if args.classes:
        out += ["--classes", str(args.classes)]
    out += ["--precision", args.precision]
    if args.in_process:
        out.append("--in-process")
    if args.serve_nice:
        out += ["--nice", str(args.serve_nice)]
    out += ["--event-loop", args.event_loop]  # always: the server's default may differ from this run's choice
    if args.worker_spin_ms:
        out += ["--worker-spin-ms", str(args.worker_spin_ms)]
    return out


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", name)


def run_sim(args, arrivals: Arrivals, window) -> dict[str, list[RequestRecord]]:
    from slonn.scheduler.simulator import build_setup, run_policy, sim_config

    if window is not None:
        args.corunner_start_s, args.corunner_stop_s = window
    setup = build_setup(args)
    runs, rates = {}, {}
    for name in args.policies:
        result = run_policy(setup, arrivals, name, sim_config(args), args.seed)
        runs[name] = result.records
        rates[name] = round(result.requests_per_s)
        print(f"  sim {name:<14} {len(result.records)} requests, {result.wall_s:.2f} s wall "
              f"({result.requests_per_s:,.0f} simulated requests/s)", file=sys.stderr, flush=True)
    args.sim_rates = rates
    return runs


def run_live(args, arrivals: Arrivals, window, deadlines_ms: dict[str, float]) -> dict[str, list[RequestRecord]]:
    from slonn.scheduler import aio
    from slonn.scheduler.replay import client_kwargs, replay, replay_with_corunner
    from slonn.scripts.serve import call_at_niceness
    from slonn.scheduler.serverproc import ServerProcess
    from slonn.workers.artifact import load_heldout, load_manifest

    manifest = load_manifest(args.model_dir)
    inputs = load_heldout(args.model_dir)  # the rows the simulator's accuracy draw scores
    runs = {}
    args.live_loadavg = {}
    args.corunner_usage = {}
    client_niceness = args.client_niceness = {}
    for name in args.policies:
        serve_args = live_serve_args(args, name)
        t0 = time.monotonic()
        load_before, cpu_before = _loadavg(), _cpu_times()
        with ServerProcess(serve_args, args.out / f"server-{slug(name)}.log") as server:
            origin: dict = {}
            kwargs = dict(inputs=inputs, progress=False, **client_kwargs(args),
                          on_start=lambda t: origin.setdefault("t0", t))  # the records' t = 0
            if window is None:
                coro = replay(server.target, manifest.name, arrivals, deadlines_ms, **kwargs)
            else:
                usage = args.corunner_usage[name] = {}
                coro = replay_with_corunner(server.target, manifest.name, arrivals, deadlines_ms, window[0],
                                            window[1], args.corunner_procs, usage=usage,
                                            corunner_device=args.burn_device, **kwargs)
            with StealSampler() as sampler:
                # On a thread of its own at the client's niceness: the servers started here keep theirs.
                runs[name], client_niceness[name] = call_at_niceness(lambda: aio.run(coro, args.event_loop),
                                                                     args.client_nice)
            t_replay = origin.get("t0", sampler.started)
        # The machine may be shared: record how busy it was (1-min load average, all processes).
        steal = steal_pct(cpu_before, _cpu_times())
        args.live_loadavg[name] = {"before": load_before, "after": _loadavg(), "steal_pct": steal}
        if window is not None:
            bounds = {"before": (0.0, window[0]), "during": window, "after": (window[1], arrivals.duration_s)}
            args.live_loadavg[name]["steal_pct_by_phase"] = {
                phase: sampler.steal_pct_between(t_replay + a, t_replay + b) for phase, (a, b) in bounds.items()}
        args.live_loadavg[name]["steal_pct_per_10s"] = sampler.series(t_replay, t_replay + arrivals.duration_s, 10.0)
        got = args.corunner_usage.get(name, {}).get("cores")
        print(f"  live {name:<14} {len(runs[name])} requests, {time.monotonic() - t0:.0f} s (incl. server start)"
              f"; CPU stolen by the host {steal}%"
              + (f"; co-runner got {got} cores" if got is not None else ""), file=sys.stderr, flush=True)
    return runs


def _cpu_times() -> list[int] | None:
    """The aggregate ``cpu`` line of /proc/stat (user nice system idle iowait irq softirq steal ...), or None."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def steal_pct(before: list[int] | None, after: list[int] | None) -> float | None:
    """Share of all CPU time between two :func:`_cpu_times` readings that the hypervisor gave to other guests
    (steal, the 8th field): on a shared VM the same code answers slower when this is up."""
    if not before or not after or len(before) < 8 or len(after) < 8:
        return None
    total = sum(after[:8]) - sum(before[:8])
    return round(100.0 * (after[7] - before[7]) / total, 2) if total > 0 else None


class StealSampler:
    """Samples :func:`_cpu_times` every ``period_s`` on a thread, so steal can be split by phase of a replay
    (``steal_pct_between``): on a shared VM, the hypervisor's share during the co-runner's window says how
    much of a miss there is the host's."""

    def __init__(self, period_s: float = 0.5) -> None:
        import threading

        if period_s <= 0:
            raise ValueError(f"StealSampler(period_s={period_s}): must be > 0")
        self.period_s = period_s
        self.started = time.monotonic()
        self.samples: list[tuple[float, list[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steal-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            times = _cpu_times()
            if times:
                self.samples.append((time.monotonic(), times))
            if self._stop.wait(self.period_s):
                return

    def __enter__(self) -> "StealSampler":
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        times = _cpu_times()
        if times:
            self.samples.append((time.monotonic(), times))

    def steal_pct_between(self, t0: float, t1: float) -> float | None:
        """Steal % between the samples nearest to monotonic times ``t0`` and ``t1``."""
        if len(self.samples) < 2:
            return None
        first = min(self.samples, key=lambda s: abs(s[0] - t0))
        last = min(self.samples, key=lambda s: abs(s[0] - t1))
        return steal_pct(first[1], last[1]) if last[0] > first[0] else None

    def series(self, t0: float, t1: float, bin_s: float) -> list[float | None]:
        """Steal % per ``bin_s`` from monotonic time ``t0`` to ``t1`` (to set misses beside the host's share)."""
        n = max(0, math.ceil((t1 - t0) / bin_s - 1e-9))
        return [self.steal_pct_between(t0 + k * bin_s, min(t1, t0 + (k + 1) * bin_s)) for k in range(n)]


def _loadavg() -> float | None:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return None


def table_rows(mode: str, runs: dict[str, list[RequestRecord]], duration_s: float, classes: list[str],
               window) -> list[dict]:
    from slonn.scheduler.replay import phase_summaries

    rows = []
    for name, records in runs.items():
        s = summarize(records, duration_s)
        row = {"mode": mode, "policy": name,
               **{f"attain_{c}": s.get(c, {}).get("attainment") for c in classes},
               "attain_all": s["all"]["attainment"], "served_accuracy": s["all"]["served_accuracy"],
               "p99_ms": s["all"]["p99_ms"], "p99_interactive_ms": s.get("interactive", {}).get("p99_ms"),
               "levels": s["all"]["levels"], "errors": s["all"]["errors"], "summary": s}
        if window is not None:
            phases = phase_summaries(records, window[0], window[1], duration_s)
            row["phases"] = phases
            for c in classes:
                row[f"during_{c}"] = phases.get("during", {}).get("summary", {}).get(c, {}).get("attainment")
        rows.append(row)
    return rows


def sim_live_gap(rows: list[dict], classes: list[str]) -> dict[str, dict[str, float]]:
    """Per policy run in both modes: simulated minus live attainment, in points, per class (and ``all``; and
    ``during_<class>`` with a co-runner). Positive: the simulator is optimistic. {} without both modes."""
    by_mode = {(r["mode"], r["policy"]): r for r in rows}
    keys = [f"attain_{c}" for c in classes] + ["attain_all"] + [f"during_{c}" for c in classes]
    gaps: dict[str, dict[str, float]] = {}
    for (mode, policy), sim in by_mode.items():
        live = by_mode.get(("live", policy))
        if mode != "sim" or live is None:
            continue
        gaps[policy] = {k.removeprefix("attain_"): round((sim[k] - live[k]) * 100, 1) for k in keys
                        if sim.get(k) is not None and live.get(k) is not None}
    return gaps


def markdown(rows: list[dict], classes: list[str], dense_accuracy: float, window) -> str:
    pct = lambda v: "-" if v is None else f"{v * 100:.1f}%"
    head = ["mode", "policy", *[f"{c} in SLO" for c in classes], "served acc", "p99 ms (all)", "p99 ms (interactive)"]
    if window is not None:
        head += [f"{c} in SLO, co-runner on" for c in classes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = "-" if r["served_accuracy"] is None else f"{r['served_accuracy'] * 100:.2f}%"
        cells = [r["mode"], f"`{r['policy']}`", *[pct(r[f"attain_{c}"]) for c in classes], acc,
                 f"{r['p99_ms']}", f"{r['p99_interactive_ms']}"]
        if window is not None:
            cells += [pct(r.get(f"during_{c}")) for c in classes]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nDense (keep 1.0) held-out accuracy: {dense_accuracy * 100:.2f}%.")
    gaps = sim_live_gap(rows, classes)
    if gaps:
        cols = list(next(iter(gaps.values())))
        lines += ["\nSimulated minus live attainment (points; positive: the simulator is optimistic):\n",
                  "| policy | " + " | ".join(c.replace("during_", "during, ") for c in cols) + " |",
                  "|" + "---|" * (len(cols) + 1)]
        lines += [f"| `{policy}` | " + " | ".join(f"{g.get(c, float('nan')):+.1f}" for c in cols) + " |"
                  for policy, g in gaps.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from slonn.scheduler.config import load_classes
    from slonn.scheduler.plots import latency_cdf, timeline
    from slonn.workers.corunner import add_corunner_device_arg, corunner_device_or_exit
    from slonn.scheduler.replay import add_arrival_args, add_client_args, arrivals_from_args
    from slonn.scripts.serve import spin_ms
    from slonn.scheduler.simulator import add_sim_args
    from slonn.workers.artifact import load_manifest

    p = argparse.ArgumentParser(prog="slonn compare", description=__doc__.splitlines()[0])
    add_arrival_args(p)
    add_client_args(p)
    add_sim_args(p)
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                   help="comma-separated; ';' also separates (for names with parameters, e.g. 'triton:max_batch=16')")
    p.add_argument("--sim", action="store_true", help="run the simulator")
    p.add_argument("--live", action="store_true", help="run live servers (default when --sim is not given)")
    p.add_argument("--corunner", action="store_true", help="co-runner on for the middle third of the replay")
    p.add_argument("--corunner-procs", type=int, default=1, help="live co-runner processes (cores, or GPU shares)")
    add_corunner_device_arg(p)
    p.add_argument("--serve-nice", type=int, default=0,
                   help="live servers' `slonn serve --nice`: -10 runs them (and their workers) ahead of the "
                        "co-runner, as a latency-critical tier above a best-effort neighbour (needs CAP_SYS_NICE)")
    p.add_argument("--client-nice", type=int, default=None,
                   help="niceness of the live replay client (absolute; default: unchanged). The load generator "
                        "stands for callers on other machines: -10 with --serve-nice -10 keeps it from competing "
                        "with the co-runner, which runs at niceness 0 (needs CAP_SYS_NICE)")
    p.add_argument("--worker-spin-ms", type=spin_ms, default=0.0,
                   help="live servers' `slonn serve --worker-spin-ms`: workers poll this long for the next batch")
    p.add_argument("--in-process", action="store_true",
                   help="live servers run the model on a thread of the server process (`slonn serve --in-process`)")
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    p.add_argument("--bins", type=int, default=60, help="time bins of the timeline plot")
    args = p.parse_args(argv)
    if args.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        p.error("--event-loop uvloop: uvloop is not installed (pip install uvloop, or pip install -e '.[uvloop]')")
    sep = ";" if ";" in args.policies else ","
    args.policies = [s.strip() for s in args.policies.split(sep) if s.strip()]
    if not args.sim and not args.live:
        args.live = True
    args.burn_device = corunner_device_or_exit(p, args.corunner_device) if args.corunner and args.live else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    arrivals = arrivals_from_args(args)
    classes_cfg = load_classes(args.classes)
    deadlines = {n: c.latency_ms for n, c in classes_cfg.items()}
    classes = sorted(set(arrivals.classes), key=lambda c: deadlines[c])
    duration = arrivals.duration_s
    window = (duration / 3, 2 * duration / 3) if args.corunner else None
    manifest = load_manifest(args.model_dir)
    dense = manifest.accuracy[max(manifest.levels)]
    print(f"{len(arrivals)} requests over {duration:.1f} s ({arrivals.describe()['mean_rate_per_s']}/s); "
          f"policies {args.policies}; co-runner {window}", file=sys.stderr, flush=True)

    rows, plots, all_runs = [], [], {}
    modes = [m for m, on in (("sim", args.sim), ("live", args.live)) if on]
    for mode in modes:
        runs = run_sim(args, arrivals, window) if mode == "sim" else run_live(args, arrivals, window, deadlines)
        rows += table_rows(mode, runs, duration, classes, window)
        for name, records in runs.items():
            write_csv(records, args.out / f"{mode}-{slug(name)}.csv")
        all_runs[mode] = runs
    # Plots last: a plotting failure must not lose a run that took minutes (the CSVs are already written).
    for mode, runs in all_runs.items():
        try:
            plots.append(str(latency_cdf(runs, deadlines, args.out / f"{mode}-latency-cdf.png",
                                         f"{mode}: latency CDF, {arrivals.describe()['mean_rate_per_s']} req/s")))
            plots.append(str(timeline(runs, duration, args.out / f"{mode}-timeline.png", window, args.bins,
                                      f"{mode}: attainment and served level over time")))
        except Exception as exc:  # noqa: BLE001 - report it, keep the table
            print(f"plots for {mode} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    report = {"load": arrivals.describe(), "policies": args.policies, "modes": modes,
              "corunner_window_s": window, "corunner_device": args.burn_device if window else None,
              "dense_accuracy": dense,
              "sim": {"simulated_requests_per_s": getattr(args, "sim_rates", None),
                      "planner_table": args.planner_table, "workers": args.workers,
                      "compiled": compiled_state()["compiled"]} if args.sim else None,
              "live_loadavg_1min": getattr(args, "live_loadavg", None), "cpus": os.cpu_count(),
              "live_corunner_usage": getattr(args, "corunner_usage", None) or None,
              "serve_nice": args.serve_nice, "client_nice": args.client_nice,
              "client_niceness_effective": getattr(args, "client_niceness", None) or None,
              "event_loop": args.event_loop, "worker_spin_ms": args.worker_spin_ms,
              "sim_live_gap_pts": sim_live_gap(rows, classes) or None, "rows": rows, "plots": plots}
    (args.out / "compare.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    md = markdown(rows, classes, dense, window)
    (args.out / "compare.md").write_text(f"Load: {json.dumps(arrivals.describe(), default=float)}\n\n" + md)
    print(md)
    print(f"wrote {args.out / 'compare.json'}, {args.out / 'compare.md'}, plots: {', '.join(plots)}", file=sys.stderr)
    return 0
