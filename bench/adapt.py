"""`python -m bench.adapt --json`: seconds from a co-runner's start until the server's chosen levels shift.

Steady open-loop load of one class against a live server; a CPU co-runner
(two busy processes at niceness 0 by default) starts at ``--corunner-start-s``.

Who competes with the co-runner. By default everything shares every CPU:
on 2 vCPUs the co-runner slows the gRPC front end and the load generator as
much as the model, and the levels shift only once the model, not the front
end, is what runs late; hence the default load of 300 req/s, where batches
form. ``--pin`` puts the model worker and the co-runner on the last CPU and
the front end and the load generator on the others (``slonn serve --cpus 0
--worker-cpus 1``): the co-runner then slows the model alone, the case of a
neighbour's kernels on the same GPU. On 2 vCPUs that leaves one core for the
front end and the client, which carries about 100 req/s on a noisy host but
not 150-200. Raising the front end's priority instead (``--serve-nice -10
--worker-nice 0 --client-nice -10``) starves the worker behind the front end
before the co-runner even starts (50-88% in time on 2 vCPUs).

The chosen keep fraction per request is binned over time; the shift time is
the end of the first bin after the start whose mean level leaves the quiet
baseline's band (mean +- max(3 sd, 10%) over the last 3 s before the start,
see ``BASELINE_S``) and stays out for the next two bins.

A level shift needs a reason to shift: when the fastest level is also the most
accurate one, or when
the most accurate level still meets the deadline under the co-runner, the
planner keeps it and ``shift_s`` stays None. So the same test is also applied to what
the planner believes, which every response carries: its predicted exec ms,
divided by the quiet phase's median prediction for the same (level, batch
size). ``prediction_shift_s`` is when that ratio leaves its quiet band: the
time for the learned latency table to react, whatever the levels do. (With a
policy that scales the table, ``--policy slonn:recent_tau_ms=60``, responses
carry its bound, the table's mean x factor x margin once the margin is known,
so it times that factor too.) ``--deadline-ms`` overrides the class's
deadline: at 8-12 ms the co-runner made the levels shift in 15 of 17 runs on
a 2-vCPU VM, where at the packaged 25 ms the quiet level mostly still fitted
(docs/results.md).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import numpy as np

from slonn.scheduler.config import SLOClassConfig, load_classes
from slonn.scheduler.replay import TRANSPORTS, phase_summaries, replay_with_corunner
from slonn.scheduler.report import RequestRecord, write_csv
from slonn.scheduler.serverproc import ServerProcess
from slonn.scheduler.trace import poisson_arrivals
from slonn.scripts.serve import call_at_niceness
from slonn.workers.corunner import (
    add_corunner_device_arg,
    corunner_device_or_exit,
    niceness_of,
)
from slonn.workers.placement import set_cpus

log = logging.getLogger(__name__)

QUIET_ATTAINMENT_MIN = 0.95
"""Below this share answered in time before the co-runner, the load alone overloads the machine: the
shift times then describe an overloaded server, and the result says so (``quiet_overloaded``)."""


def flag_quiet_overload(result: dict, slo_class: str, rate: float) -> bool:
    """Set ``result["quiet_overloaded"]`` from its phases, warning when it is true; returns it."""
    over = result["quiet_overloaded"] = quiet_overloaded(result["phases"], slo_class)
    if over:
        log.warning("only %.1f%% of %s answered in time before the co-runner: %.0f req/s overloads this machine "
                    "on its own; lower --rate", 100 * result["phases"]["before"][slo_class]["attainment"],
                    slo_class, rate)
    return over


def quiet_overloaded(phases: dict, slo_class: str) -> bool:
    """Whether the phase before the co-runner answered fewer than QUIET_ATTAINMENT_MIN of ``slo_class``."""
    before = phases.get("before", {}).get(slo_class)
    return before is not None and before["attainment"] < QUIET_ATTAINMENT_MIN


def _bin_means(t: np.ndarray, values: np.ndarray, bin_s: float, duration_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(bin end times, mean of ``values`` whose time ``t`` falls in each bin; NaN for empty bins)."""
    edges = np.arange(0.0, duration_s + bin_s, bin_s)
    means = np.full(len(edges) - 1, np.nan)
    for i in range(len(edges) - 1):
        sel = (t >= edges[i]) & (t < edges[i + 1])
        if sel.any():
            means[i] = values[sel].mean()
    return edges[1:], means


def level_series(records: list[RequestRecord], bin_s: float, duration_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(bin end times, mean chosen level per bin; NaN where nothing was served)."""
    ok = [r for r in records if r.status == "OK"]
    return _bin_means(np.array([r.send_s for r in ok]), np.array([r.level for r in ok]), bin_s, duration_s)


def prediction_series(records: list[RequestRecord], bin_s: float, duration_s: float,
                      start_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(bin end times, mean of predicted ms / the quiet median prediction of the same (level, batch size))."""
    ok = [r for r in records if r.status == "OK"]
    quiet: dict[tuple[float, int], list[float]] = {}
    for r in ok:
        if r.send_s < start_s:
            quiet.setdefault((r.level, r.batch_size), []).append(r.predicted_ms)
    ref = {k: float(np.median(v)) for k, v in quiet.items()}
    kept = [r for r in ok if (r.level, r.batch_size) in ref]
    return _bin_means(np.array([r.send_s for r in kept]),
                      np.array([r.predicted_ms / ref[(r.level, r.batch_size)] for r in kept]), bin_s, duration_s)


BASELINE_S = 3.0
"""The quiet band is taken over this many seconds before the co-runner starts. Not the whole quiet phase:
early in it the learner is still moving from the profile's prior to the live latencies (a step of -40%
in predictions ~10 s in), and a band over that step is wide enough to hide the co-runner's own jump
(predictions x2 within 1 s of the start read as a shift after 6.0 and 11.5 s with a 10 s baseline)."""


def shift_time(ends: np.ndarray, means: np.ndarray, start_s: float, stop_s: float, hold: int = 2,
               name: str = "level", baseline_s: float = BASELINE_S) -> dict:
    """When the series left the quiet band after ``start_s`` (None if it never did before ``stop_s``); the
    band is the mean +- max(3 sd, 10%) of the bins ending in the ``baseline_s`` before ``start_s``."""
    quiet = means[(ends <= start_s) & (ends > start_s - baseline_s) & ~np.isnan(means)]
    if len(quiet) < 3:
        raise ValueError("need at least 3 quiet bins before the co-runner starts; start it later")
    base, sd = float(quiet.mean()), float(quiet.std())
    band = max(3 * sd, 0.1 * base)
    prefix = "" if name == "level" else f"{name}_"
    out = {f"quiet_mean_{name}": round(base, 4), f"{prefix}band": round(band, 4), f"{prefix}shift_s": None}
    idx = np.where((ends > start_s) & (ends <= stop_s))[0]
    for k, i in enumerate(idx):
        window = means[i:i + 1 + hold]
        if len(window) == 1 + hold and np.all(np.abs(window - base) > band):
            out[f"{prefix}shift_s"] = round(float(ends[i] - start_s), 3)
            out[f"shifted_mean_{name}"] = round(float(np.nanmean(means[idx[k:]])), 4)
            break
    return out


WORKER_READY = re.compile(r"worker \d+ ready \(pid \d+, [^,]+, niceness (-?\d+), cpus ([\d,]*)\)")
"""The pool's log line for a worker that has started (``workers.pool``): the niceness and CPUs it runs at."""


def _settings_toml(c: SLOClassConfig, skip: tuple[str, ...] = ()) -> str:
    return "".join(f"{f.name} = {json.dumps(getattr(c, f.name))}\n" for f in dataclasses.fields(c)
                   if f.name != "overrides" and f.name not in skip)


def classes_toml(classes: dict[str, SLOClassConfig]) -> str:
    """``classes`` as the ``[[class]]`` TOML that ``load_classes`` reads (JSON's strings and numbers are TOML's),
    each class's per-model settings as its ``[class.model.NAME]`` tables."""
    return "".join("[[class]]\n" + _settings_toml(c) + "".join(
        f"[class.model.{json.dumps(model)}]\n" + _settings_toml(o, skip=("name",)) for model, o in c.overrides)
        for c in classes.values())


def with_deadline(classes: dict[str, SLOClassConfig], name: str, deadline_ms: float | None,
                  out: Path) -> tuple[dict[str, SLOClassConfig], Path | None]:
    """``classes`` with ``name``'s deadline set to ``deadline_ms`` (a new dict), written to ``out``, and
    ``out``; ``classes`` itself and no file when ``deadline_ms`` is None."""
    if deadline_ms is None:
        return classes, None
    changed = {**classes, name: dataclasses.replace(classes[name], latency_ms=deadline_ms)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(classes_toml(changed))
    return changed, out


def started_workers(server_log: Path) -> list[dict]:
    """Niceness and CPUs of every worker the server started, from its log."""
    return [{"niceness": int(m.group(1)), "cpus": [int(c) for c in m.group(2).split(",") if c]}
            for m in WORKER_READY.finditer(server_log.read_text(errors="replace"))]


def split_cpus(cpus: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(front end and load generator, worker and co-runner): the last CPU for the model, the rest for the
    front end; None with a single CPU (nothing to split)."""
    if len(cpus) < 2:
        return None
    return tuple(cpus[:-1]), (cpus[-1],)


def cpu_list(cpus: tuple[int, ...]) -> str:
    return ",".join(map(str, cpus))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.adapt", description=__doc__)
    p.add_argument("--model-dir", type=Path, default=Path("models/digits-mlp"))
    p.add_argument("--slo-class", default="interactive")
    p.add_argument("--classes", type=Path, default=None,
                   help="SLO classes TOML for the server and the client's deadlines (default: the packaged one), "
                        "e.g. one with a deadline the co-runner makes too tight for the quiet level")
    p.add_argument("--deadline-ms", type=float, default=None,
                   help="override the --slo-class deadline (the server is given a copy of the classes with it): "
                        "at the packaged 25 ms the quiet level often still fits under the co-runner, and the "
                        "levels have no reason to shift; at 8-12 ms they do")
    p.add_argument("--rate", type=float, default=300.0,
                   help="steady requests/s: a load the machine carries when quiet (400 overloads a 2-vCPU VM "
                        "before any co-runner) and at which batches form, so that a slower model "
                        "leaves a choice between a smaller batch and a faster level")
    p.add_argument("--duration-s", type=float, default=40.0)
    p.add_argument("--corunner-start-s", type=float, default=15.0)
    p.add_argument("--corunner-stop-s", type=float, default=30.0)
    p.add_argument("--corunner-procs", type=int, default=2, help="co-runner processes (cores, or GPU shares)")
    add_corunner_device_arg(p)
    p.add_argument("--pin", action="store_true",
                   help="the worker and the co-runner on the last CPU, the front end and the load generator on "
                        "the others (default: everything on every CPU)")
    p.add_argument("--serve-nice", type=int, default=0, help="`slonn serve --nice` (front end and workers)")
    p.add_argument("--worker-nice", type=int, default=None, help="`slonn serve --worker-nice` (absolute)")
    p.add_argument("--client-nice", type=int, default=None,
                   help="the load generator's niceness (absolute; default: unchanged)")
    p.add_argument("--transport", choices=TRANSPORTS, default="unary",
                   help="one Infer call per request, or one stream")
    p.add_argument("--bin-s", type=float, default=0.5)
    p.add_argument("--policy", default="slonn", help="`slonn serve --policy`, e.g. slonn:recent_tau_ms=60")
    p.add_argument("--refit-overrun-share", type=float, default=None, metavar="X",
                   help="`slonn serve --refit-overrun-share` (default: the server's)")
    p.add_argument("--refit-contention-shift", type=float, default=None, metavar="X",
                   help="`slonn serve --refit-contention-shift` (default: the server's; inf = off)")
    p.add_argument("--csv", type=Path, default=None,
                   help="also write every request's record here (as `slonn replay --csv`)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    burn_device = corunner_device_or_exit(p, args.corunner_device)
    from slonn.workers.artifact import load_manifest

    model = load_manifest(args.model_dir).name
    try:
        classes = load_classes(args.classes)
    except (OSError, ValueError, TypeError) as e:  # tomllib's decode error is a ValueError
        p.error(f"--classes {args.classes}: {e}")
    if args.slo_class not in classes:
        p.error(f"--slo-class {args.slo_class!r} is not in {args.classes or 'the packaged classes'}: "
                f"{sorted(classes)}")
    if args.deadline_ms is not None and not 0 < args.deadline_ms < math.inf:
        p.error(f"--deadline-ms {args.deadline_ms} must be finite and > 0")
    # The server and the client's deadlines both come from this one dict.
    classes, written = with_deadline(classes, args.slo_class, args.deadline_ms, Path("runs/adapt/classes.toml"))
    classes_file = written or args.classes
    deadlines = {n: c.latency_ms for n, c in classes.items()}
    arrivals = poisson_arrivals(args.rate, args.duration_s, {args.slo_class: 1.0})
    server_log = Path("runs/adapt/server.log")
    serve = ["--model-dir", str(args.model_dir), "--stats-interval-s", "2", "--nice", str(args.serve_nice),
             "--policy", args.policy]
    if classes_file:
        serve += ["--classes", str(classes_file)]
    if args.worker_nice is not None:
        serve += ["--worker-nice", str(args.worker_nice)]
    if args.refit_overrun_share is not None:
        serve += ["--refit-overrun-share", str(args.refit_overrun_share)]
    if args.refit_contention_shift is not None:
        serve += ["--refit-contention-shift", str(args.refit_contention_shift)]
    placement = split_cpus(sorted(os.sched_getaffinity(0))) if args.pin else None
    if args.pin and placement is None:
        p.error(f"--pin needs at least 2 CPUs; this process may use {sorted(os.sched_getaffinity(0))}")
    if placement is not None:
        front, model_cpus = placement
        serve += ["--cpus", cpu_list(front), "--worker-cpus", cpu_list(model_cpus)]
    usage: dict = {}
    with ServerProcess(serve, server_log) as srv:
        if placement is not None:
            set_cpus(placement[0])  # the load generator (this process) beside the front end
        niceness = {"server": niceness_of(srv.proc.pid)}
        front_cpus = sorted(os.sched_getaffinity(srv.proc.pid))
        records, niceness["client"] = call_at_niceness(
            lambda: asyncio.run(replay_with_corunner(srv.target, model, arrivals, deadlines, args.corunner_start_s,
                                                     args.corunner_stop_s, args.corunner_procs, usage=usage,
                                                     corunner_cpus=placement and placement[1],
                                                     corunner_device=burn_device,
                                                     transport=args.transport, progress=False)),
            args.client_nice)
    if args.csv:
        write_csv(records, args.csv)
    workers = started_workers(server_log)
    niceness["workers"] = sorted({w["niceness"] for w in workers})
    niceness["corunner"] = usage.get("niceness")
    cpus = None if placement is None else {
        "front_end_and_client": front_cpus, "workers": sorted({c for w in workers for c in w["cpus"]}),
        "corunner": list(placement[1])}
    ends, means = level_series(records, args.bin_s, args.duration_s)
    _, ratios = prediction_series(records, args.bin_s, args.duration_s, args.corunner_start_s)
    served_levels = sorted({r.level for r in records if r.status == "OK"})
    result = {
        "load": arrivals.describe(), "slo_class": args.slo_class,
        "deadline_ms": deadlines[args.slo_class], "classes": None if args.classes is None else str(args.classes),
        "corunner_procs": args.corunner_procs,
        "corunner_device": burn_device,
        "transport": args.transport, "policy": args.policy, "refit_overrun_share": args.refit_overrun_share,
        "refit_contention_shift": (None if args.refit_contention_shift is None
                                   else str(args.refit_contention_shift)),  # "inf": strict JSON has no Infinity
        "cpus": cpus, "niceness": niceness, "corunner_cores": usage.get("cores"),
        "corunner_window_s": [args.corunner_start_s, args.corunner_stop_s],
        **shift_time(ends, means, args.corunner_start_s, args.corunner_stop_s),
        **shift_time(ends, ratios, args.corunner_start_s, args.corunner_stop_s, name="prediction"),
        "served_levels": served_levels,
        "level_per_bin": [None if np.isnan(m) else round(float(m), 4) for m in means],
        "prediction_ratio_per_bin": [None if np.isnan(m) else round(float(m), 4) for m in ratios],
        "phases": {k: {c: {"attainment": s["attainment"], "p99_ms": s["p99_ms"]} for c, s in v["summary"].items()}
                   for k, v in phase_summaries(records, args.corunner_start_s, args.corunner_stop_s,
                                               args.duration_s).items()},
    }
    flag_quiet_overload(result, args.slo_class, args.rate)
    print(json.dumps(result, indent=2 if args.json else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
