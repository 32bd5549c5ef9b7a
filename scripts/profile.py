"""`slonn profile`: measure exec latency over levels x batch sizes x contention.

The model runs in a spawned worker process exactly as the server's worker
does (``ModelRunner``, ``torch.set_num_threads(threads)``, calibrated kernel
choice); this process plays the scheduler: it owns the
:class:`~policy.contention.ContentionMonitor` (told only the worker's pid) and
a co-runner at several intensities (``workers.corunner.make_burner``: CPU-burning
processes, or GPU-burning ones when the worker runs on a GPU). Every call uses
distinct inputs (the artifact's held-out rows plus small noise). Each row records the
contention the monitor reported when the batch was sent, so the model learns
from the signal the scheduler will actually see.

Writes ``<model-dir>/latency_profile.csv`` (+ ``latency_model.json``), prints a
JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from slonn.policy.contention import ContentionMonitor, time_call
from slonn.policy.latency_model import LatencyModel, LatencyModelConfig, LatencySample, MODEL_JSON, PROFILE_CSV, \
    write_rows_csv
from slonn.policy.latency_model import profile_csv_name
from slonn.precision import DEFAULT_PRECISION, PRECISIONS
from slonn.workers.corunner import BurnSpec, make_burner
from slonn.scripts.serve import spin_ms
from slonn.workers.device import gpu_uuid
from slonn.workers.placement import set_niceness

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
DEFAULT_INTENSITIES = ("0", "1x0.5", "1", "2", "3")
NOISE_FRACTION = 1 / 64
"""Std of the noise added to the held-out inputs, as a share of each feature's held-out range (0.25 for digits'
0..16 pixels)."""
DISTURBED_EXCESS = 0.1
"""Mean signal above ``intensity / n_cpus`` by more than this: someone else was loading the machine."""


def _worker(conn, model_dir: str, device: str, threads: int, calibrate: bool, seed: int, precision: str,
            nice: int | None = None, spin_ms: float = 0.0) -> None:
    """Child: load the model like a server worker (at niceness ``nice``, absolute, if given), then run batches on
    request until told to stop, waiting for each as a server worker does (``wait_for_task``)."""
    import torch

    from slonn.workers.artifact import load_heldout
    from slonn.workers.process import wait_for_task
    from slonn.workers.runner import ModelRunner

    if nice is not None:
        set_niceness(nice)
    torch.set_num_threads(threads)
    runner = ModelRunner.load(Path(model_dir), device, precision)
    kernel_table = runner.calibrate() if calibrate else {}
    pool = load_heldout(Path(model_dir))[0]
    noise_std = (pool.max(0) - pool.min(0)) * NOISE_FRACTION
    rng = np.random.default_rng(seed)
    on_thread = threads == 1 and runner.device.type == "cpu"  # the call computes on this thread alone
    conn.send({"pid": os.getpid(), "niceness": os.getpriority(os.PRIO_PROCESS, 0),
               "levels": list(runner.manifest.levels), "kernel_table": kernel_table, "device": str(runner.device),
               "gpu_uuid": gpu_uuid(runner.device)})
    while True:
        msg = wait_for_task(conn, spin_ms * 1e-3)
        if msg is None:
            break
        level, batch = msg
        idx = rng.integers(0, len(pool), batch)
        x = pool[idx] + rng.normal(0.0, 1.0, (batch, pool.shape[1])).astype(np.float32) * noise_std
        out, times = time_call(runner.run, x.astype(np.float32), level)
        pause = round(times.host_pause_ms, 4) if on_thread else ""
        conn.send((out.exec_ms, out.kernel, pause))


class ProfileWorker:
    """The worker process and its pipe."""

    def __init__(self, model_dir: Path, device: str, threads: int, calibrate: bool, seed: int,
                 precision: str = DEFAULT_PRECISION, nice: int | None = None, spin_ms: float = 0.0) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, daemon=True,
                                args=(child, str(model_dir), device, threads, calibrate, seed, precision, nice,
                                      spin_ms))
        self.proc.start()
        self.ready = self.conn.recv()

    def run(self, level: float, batch: int) -> tuple[float, str, float | str]:
        """(exec ms, kernel, host pause ms): the pause is ``CallTimes.host_pause_ms``, "" when the call does not
        compute on the worker's own thread alone (more than one torch thread, or a GPU)."""
        self.conn.send((level, batch))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(10)


def wait_quiet(monitor: ContentionMonitor, max_wait_s: float, threshold: float = DISTURBED_EXCESS) -> float:
    """Wait (up to ``max_wait_s``) until nobody else loads the machine for ~1 s; returns the seconds waited."""
    t0 = time.monotonic()
    quiet_since = None
    while time.monotonic() - t0 < max_wait_s:
        now = time.monotonic()
        if monitor.value <= threshold:
            quiet_since = quiet_since or now
            if now - quiet_since >= 1.0:
                break
        else:
            quiet_since = None
        time.sleep(0.1)
    waited = time.monotonic() - t0
    if monitor.value > threshold:
        log.warning("machine not quiet after %.0f s (others' load %.2f per CPU); measuring anyway", waited,
                    monitor.value)
    return waited


def sweep(worker: ProfileWorker, monitor: ContentionMonitor, levels, batch_sizes, intensities, reps: int,
          settle_s: float, seed: int, wait_quiet_s: float = 0.0,
          burn_device: str = "cpu") -> tuple[list[LatencySample], list[dict], dict]:
    """Run every (level, batch) ``reps`` times at every intensity (shuffled inside each intensity), with the
    co-runner on ``burn_device`` (a GPU when the worker runs on one)."""
    rng = random.Random(seed)
    rows, extra, signal = [], [], {}
    for lv in levels:  # warm-up: first touch of each kernel/shape is not a measurement
        for b in batch_sizes:
            worker.run(lv, b)
    for text in intensities:
        spec = BurnSpec.parse(text)
        calls = [(lv, b) for lv in levels for b in batch_sizes for _ in range(reps)]
        rng.shuffle(calls)
        waited = wait_quiet(monitor, wait_quiet_s) if wait_quiet_s > 0 else 0.0
        t0 = time.monotonic()
        with make_burner(burn_device, spec.n_procs, spec.duty):
            time.sleep(settle_s)  # let the co-runner start and the smoothed signal catch up
            values = []
            for lv, b in calls:
                c = monitor.value
                comp = monitor.components()
                exec_ms, kernel, pause_ms = worker.run(lv, b)
                values.append(c)
                rows.append(LatencySample(lv, b, c, exec_ms, kernel))
                extra.append({"intensity": spec.intensity, "burn": spec.label(), "load": round(comp["load"], 4),
                              "probe": round(comp["probe"], 4),
                              "gpu": "" if comp["gpu"] is None else round(comp["gpu"], 4),
                              "t_s": round(time.monotonic(), 3),
                              "host_pause_ms": pause_ms, "worker_nice": worker.ready["niceness"]})
        expected = expected_signal(spec, monitor.n_cpus, burn_device)
        signal[spec.label()] = {"intensity": spec.intensity, "contention_mean": round(statistics.fmean(values), 4),
                                "contention_expected": round(expected, 4),
                                "disturbed": statistics.fmean(values) - expected > DISTURBED_EXCESS,
                                "contention_p10": round(float(np.quantile(values, 0.1)), 4),
                                "contention_p90": round(float(np.quantile(values, 0.9)), 4),
                                "seconds": round(time.monotonic() - t0, 1), "waited_quiet_s": round(waited, 1)}
        log.info("intensity %s: %s", text, signal[spec.label()])
    return rows, extra, signal


def expected_signal(spec: BurnSpec, n_cpus: int, burn_device: str) -> float:
    """The contention a co-runner alone should show: its cores per CPU, or on a GPU its share of the GPU."""
    return spec.intensity / n_cpus if burn_device == "cpu" else min(1.0, spec.intensity)


def signal_check(worker: ProfileWorker, monitor: ContentionMonitor, intensities, seconds: float,
                 rounds: int, burn_device: str = "cpu") -> dict:
    """The contention signal per co-runner setting while the worker runs batches back to back.

    Each setting is measured right after a no-co-runner baseline, ``rounds`` times, so load from other
    processes that comes and goes shows up in the baseline and ``delta`` is what the co-runner added.
    """
    def measure(spec: BurnSpec) -> tuple[float, float]:
        with make_burner(burn_device, spec.n_procs, spec.duty):
            t_end = time.monotonic() + 0.6  # let the 0.5 s smoothing window fill with this setting
            while time.monotonic() < t_end:
                worker.run(1.0, 16)
            values, probes = [], []
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                worker.run(1.0, 16)
                values.append(monitor.value)
                probes.append(monitor.components()["probe"])
        return statistics.fmean(values), statistics.fmean(probes)

    out = {}
    for text in intensities:
        spec = BurnSpec.parse(text)
        raw, base, probe = [], [], []
        for _ in range(rounds):
            b, _ = measure(BurnSpec(0))
            v, pr = measure(spec)
            base.append(b)
            raw.append(v)
            probe.append(pr)
        out[spec.label()] = {"intensity": spec.intensity,
                             "expected": round(expected_signal(spec, monitor.n_cpus, burn_device), 3),
                             "value": round(statistics.fmean(raw), 3), "baseline": round(statistics.fmean(base), 3),
                             "delta": round(statistics.fmean(raw) - statistics.fmean(base), 3),
                             "probe_slowdown": round(statistics.fmean(probe), 3)}
        log.info("signal %s: %s", text, out[spec.label()])
    return out


def _machine() -> dict:
    import torch

    with open("/proc/loadavg") as f:
        loadavg = f.read().split()[:3]
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "loadavg_at_start": loadavg}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slonn profile", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=Path("models/digits-mlp"))
    p.add_argument("--out", type=Path, default=None,
                   help=f"CSV path (default <model-dir>/{PROFILE_CSV}, latency_profile-<precision>.csv for another "
                        "precision)")
    p.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS,
                   help="worker weight precision to profile (the server's --precision)")
    p.add_argument("--levels", type=float, nargs="*", default=None, help="default: the model's levels")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=list(DEFAULT_BATCH_SIZES))
    p.add_argument("--intensities", nargs="*", default=list(DEFAULT_INTENSITIES),
                   help="co-runner settings: N (N busy processes) or NxD (N processes at duty D)")
    p.add_argument("--reps", type=int, default=12, help="measurements per (level, batch, intensity)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the worker (the server's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker-nice", type=int, default=None, choices=range(-20, 20), metavar="N",
                   help="the worker's niceness (absolute, -20..19; the co-runners stay at 0): profile the worker "
                        "at the niceness it will be served at, e.g. -10 for `slonn serve --nice -10` started "
                        "at 0. Lowering it needs CAP_SYS_NICE")
    p.add_argument("--worker-spin-ms", type=spin_ms, default=0.0,
                   help="the worker polls this long for the next call before blocking, as `slonn serve "
                        "--worker-spin-ms` makes it; profile with the setting it will be served with")
    p.add_argument("--no-calibrate", action="store_true", help="skip ModelRunner.calibrate() (kernel choice)")
    p.add_argument("--settle-s", type=float, default=1.0)
    p.add_argument("--wait-quiet-s", type=float, default=20.0,
                   help="before each intensity, wait up to this long for other processes' load to go away")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--signal-only", action="store_true",
                   help="only report the contention signal per intensity (worker busy, baseline before each)")
    p.add_argument("--signal-seconds", type=float, default=3.0)
    p.add_argument("--signal-rounds", type=int, default=2)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.reps < 1 or not args.batch_sizes or min(args.batch_sizes) < 1:
        raise SystemExit("--reps must be >= 1 and --batch-sizes positive integers")
    t0 = time.monotonic()
    machine = _machine()
    worker = ProfileWorker(args.model_dir, args.device, args.threads, not args.no_calibrate, args.seed,
                           args.precision, args.worker_nice, args.worker_spin_ms)
    if args.worker_nice is not None and worker.ready["niceness"] != args.worker_nice:
        log.warning("--worker-nice %d: not permitted (needs CAP_SYS_NICE); the worker runs at niceness %d, "
                    "which every row records", args.worker_nice, worker.ready["niceness"])
    levels = sorted(args.levels or worker.ready["levels"], reverse=True)
    monitor = ContentionMonitor(own_pids=[worker.ready["pid"]])
    burn_device = "cpu"
    if worker.ready["gpu_uuid"]:  # the co-runner contends for what the model runs on, and is watched there
        monitor.watch_gpu(worker.ready["gpu_uuid"])
        burn_device = worker.ready["device"]
    monitor.start()
    if args.signal_only:
        try:
            signal = signal_check(worker, monitor, args.intensities, args.signal_seconds, args.signal_rounds,
                                  burn_device)
        finally:
            monitor.stop()
            worker.close()
        print(json.dumps({"contention_signal": signal, "mode": monitor.mode, "interval_s": monitor.interval_s,
                          "probe_baseline_ms": round(monitor.baseline_ms, 4),
                          "seconds": round(time.monotonic() - t0, 1), "machine": machine}, indent=2))
        return 0
    try:
        rows, extra, signal = sweep(worker, monitor, levels, args.batch_sizes, args.intensities, args.reps,
                                    args.settle_s, args.seed, args.wait_quiet_s, burn_device)
    finally:
        monitor.stop()
        worker.close()
    out = args.out or args.model_dir / profile_csv_name(args.precision)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_rows_csv(out, rows, extra)
    model = LatencyModel(LatencyModelConfig()).fit(rows)
    if args.precision == DEFAULT_PRECISION:  # the hyper-parameters file names the default profile
        (out.parent / MODEL_JSON).write_text(json.dumps({"config": model.describe()["config"], "profile_csv": out.name,
                                                       "rows": len(rows), "format_version": 1}, indent=2) + "\n")
    disturbed = [k for k, v in signal.items() if v["disturbed"]]
    if disturbed:
        log.warning("other load during %s (signal above the co-runner's own): rerun on a quieter machine "
                    "for clean per-intensity figures", disturbed)
    print(json.dumps({"profile_csv": str(out), "rows": len(rows), "seconds": round(time.monotonic() - t0, 1),
                      "disturbed_intensities": disturbed,
                      "threads": args.threads, "device": worker.ready["device"], "precision": args.precision,
                      "worker_niceness": worker.ready["niceness"], "corunner_device": burn_device,
                      "worker_spin_ms": args.worker_spin_ms,
                      "levels": levels,
                      "batch_sizes": args.batch_sizes, "contention_per_intensity": signal,
                      "kernel_table": worker.ready["kernel_table"], "model": model.describe(),
                      "monitor": {"probe_baseline_ms": round(monitor.baseline_ms, 4), "interval_s": monitor.interval_s,
                                  "mode": monitor.mode},
                      "machine": machine}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
