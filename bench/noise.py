"""`python -m bench.noise`: where the scatter of quiet batch latencies comes from, per call.

The latency model's held-out error is bounded by how much the same (level, batch size, contention) cell
scatters (docs/latency-model.md, "Evaluating the model": the noise floor). This script runs a few cells of the worker's
model in this process, one torch thread, nothing else of ours running, and records per call:

- ``wall_ms``: the model call's wall time (what the server measures);
- ``cpu_ms``: this thread's CPU time over the call (``time.thread_time_ns``). On a paravirtualised VM the
  kernel does not count time the hypervisor took away from the vCPU (steal) as the thread's CPU time, nor
  time another task of this VM ran instead;
- ``runq_ms``: time this thread waited on the run queue behind other tasks of this VM
  (``/proc/thread-self/schedstat``; null where the kernel has no schedstats; see
  ``policy.contention.time_call``);
- ``steal_ticks``: the machine's steal counter from ``/proc/stat`` over the call (1/100 s ticks, all vCPUs).

So ``wall - cpu - runq`` is time the vCPU did not run at all (``lost`` below). The JSON says per cell how
many calls were slow (over 1.25x the cell's median) and what they lost, how well the previous 100 ms predict
a call's lost share (the best a steal feature in the contention signal could do), and the held-out MAPE (every
fourth call) of the cell mean against wall time, against wall time with a steal feature, and against
CPU time: the last is what the same predictor would score if the host never paused the vCPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from slonn.policy.contention import CallTimes, time_call
from slonn.policy.latency_model import mape

DEFAULT_CELLS = ("0.1x12", "1.0x32", "0.25x4", "1.0x64")
SLOW_RATIO = 1.25
"""A call slower than this times its cell's median wall time counts as slow."""
HISTORY_S = 0.1
"""The window before a call whose lost share is the steal feature."""


@dataclass(frozen=True)
class Call:
    level: float
    batch: int
    t_s: float
    times: CallTimes
    steal_ticks: int | None

    @property
    def lost_share(self) -> float:
        """Share of the call's wall time the host paused it (``CallTimes.host_pause_ms / wall_ms``)."""
        wall = self.times.wall_ms
        return self.times.host_pause_ms / wall if wall > 0 else 0.0


def parse_cell(text: str) -> tuple[float, int]:
    """``LEVELxBATCH`` (e.g. ``0.1x12``) -> (0.1, 12)."""
    try:
        level, batch = text.lower().split("x")
        out = float(level), int(batch)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cell {text!r}: expected LEVELxBATCH, e.g. 0.1x12") from None
    if not (0 < out[0] <= 1 and out[1] >= 1):
        raise argparse.ArgumentTypeError(f"cell {text!r}: level must be in (0, 1] and batch >= 1")
    return out


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def history_feature(calls: list[Call], window_s: float = HISTORY_S) -> np.ndarray:
    """For each call (in time order), the mean lost share of the calls that started in the ``window_s`` before
    it (0 if none): what a contention signal that tracked steal could know when the batch starts."""
    t = np.array([c.t_s for c in calls])
    lost = np.array([c.lost_share for c in calls])
    out = np.zeros(len(calls))
    lo = 0
    for i in range(len(calls)):
        while t[lo] < t[i] - window_s:
            lo += 1
        if lo < i:
            out[i] = lost[lo:i].mean()
    return out


def summarise_cell(calls: list[Call], feature: np.ndarray) -> dict:
    """Figures for one cell's calls (in time order) and their history feature."""
    wall = np.array([c.times.wall_ms for c in calls])
    cpu = np.array([c.times.cpu_ms for c in calls])
    lost = np.array([c.times.host_pause_ms for c in calls])
    slow = wall > SLOW_RATIO * np.median(wall)
    test = np.arange(len(calls)) % 4 == 3
    train = ~test
    out: dict = {"calls": len(calls), "wall_ms_median": round(float(np.median(wall)), 3),
                 "wall_ms_p90": round(float(np.quantile(wall, 0.9)), 3),
                 "cpu_ms_median": round(float(np.median(cpu)), 3),
                 "slow_share": round(float(slow.mean()), 4)}
    for name, mask in (("fast", ~slow), ("slow", slow)):
        out[f"lost_ms_median_{name}"] = round(float(np.median(lost[mask])), 3) if mask.any() else None
        rq = [c.times.runq_ms for c, m in zip(calls, mask) if m and c.times.runq_ms is not None]
        out[f"runq_ms_median_{name}"] = round(statistics.median(rq), 3) if rq else None
    ticks = [c.steal_ticks for c in calls if c.steal_ticks is not None]
    if ticks:
        out["steal_ticks_in_slow_calls"] = sum(c.steal_ticks or 0 for c, s in zip(calls, slow) if s)
        out["steal_ticks_in_fast_calls"] = sum(c.steal_ticks or 0 for c, s in zip(calls, slow) if not s)
    if train.sum() >= 3 and test.any():
        out["mape_wall_cell_mean"] = round(0.01 * mape(np.full(test.sum(), wall[train].mean()), wall[test]), 4)
        x = np.column_stack([np.ones(train.sum()), feature[train]])
        coef, *_ = np.linalg.lstsq(x, wall[train], rcond=None)
        pred = coef[0] + coef[1] * feature[test]
        out["mape_wall_with_steal_feature"] = round(0.01 * mape(pred, wall[test]), 4)
        out["mape_cpu_cell_mean"] = round(0.01 * mape(np.full(test.sum(), cpu[train].mean()), cpu[test]), 4)
    return out


def summarise(calls: list[Call], window_s: float = HISTORY_S) -> dict:
    """Per-cell figures, and the lag-1 / recent-history correlation of the lost share over all calls."""
    calls = sorted(calls, key=lambda c: c.t_s)
    feature = history_feature(calls, window_s)
    lost = np.array([c.lost_share for c in calls])
    cells: dict[str, dict] = {}
    for key in sorted({(c.level, c.batch) for c in calls}):
        idx = [i for i, c in enumerate(calls) if (c.level, c.batch) == key]
        cells[f"{key[0]}x{key[1]}"] = summarise_cell([calls[i] for i in idx], feature[idx])
    mape_keys = ("mape_wall_cell_mean", "mape_wall_with_steal_feature", "mape_cpu_cell_mean")
    return {"calls": len(calls), "seconds": round(calls[-1].t_s - calls[0].t_s, 1) if calls else 0.0,
            "lost_share_mean": round(float(lost.mean()), 4) if calls else None,
            "lost_share_autocorr_lag1": _round(_corr(lost[1:], lost[:-1])),
            f"lost_share_corr_with_previous_{int(window_s * 1e3)}ms": _round(_corr(feature[1:], lost[1:])),
            "mape_mean_over_cells": {k: round(statistics.fmean(c[k] for c in cells.values()), 4)
                                     for k in mape_keys if all(k in c for c in cells.values()) and cells},
            "cells": cells}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _steal_ticks() -> int | None:
    try:
        with open("/proc/stat") as f:
            return int(f.readline().split()[8])
    except (OSError, IndexError, ValueError):
        return None


def measure(model_dir: Path, precision: str, cells: list[tuple[float, int]], calls_per_cell: int,
            gap_s: float, seed: int, spin: bool = False) -> list[Call]:
    """Run the cells round-robin in this process (one torch thread) and time every call; between calls sleep
    ``gap_s`` (the thread and its vCPU go idle, as a worker between batches does), or with ``spin`` busy-wait
    it (the vCPU stays busy)."""
    import torch

    from slonn.workers.digits import load_split
    from slonn.workers.runner import ModelRunner

    torch.set_num_threads(1)
    runner = ModelRunner.load(model_dir, "cpu", precision)
    runner.calibrate()
    pool = load_split().x_test
    rng = np.random.default_rng(seed)

    def inputs(batch: int) -> np.ndarray:  # a different noisy batch every call
        x = pool[rng.integers(0, len(pool), batch)] + rng.normal(0.0, 0.25, (batch, pool.shape[1]))
        return x.astype(np.float32)

    for level, batch in cells:  # warm-up
        for _ in range(3):
            runner.run(inputs(batch), level)
    out = []
    for _ in range(calls_per_cell):
        for level, batch in cells:
            x = inputs(batch)
            t_s, s0 = time.perf_counter(), _steal_ticks()
            _, times = time_call(runner.run, x, level)
            s1 = _steal_ticks()
            out.append(Call(level, batch, t_s, times,
                            None if s0 is None or s1 is None else s1 - s0))
            if spin:
                t_end = time.perf_counter() + gap_s
                while time.perf_counter() < t_end:
                    pass
            else:
                time.sleep(gap_s)
    return out


def main(argv: list[str] | None = None) -> int:
    from slonn.precision import DEFAULT_PRECISION, PRECISIONS

    p = argparse.ArgumentParser(prog="python -m bench.noise", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=Path("models/digits-mlp"))
    p.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS)
    p.add_argument("--cells", type=parse_cell, nargs="+", default=[parse_cell(c) for c in DEFAULT_CELLS],
                   help="LEVELxBATCH cells to time, round-robin")
    p.add_argument("--calls", type=int, default=150, help="calls per cell")
    p.add_argument("--gap-ms", type=float, default=2.0, help="time between calls")
    p.add_argument("--spin", action="store_true",
                   help="busy-wait between calls instead of sleeping (a bare loop; a server worker's "
                        "--worker-spin-ms polls its pipe and yields, workers.process.wait_for_task)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calls-out", type=Path, default=None, help="also write every call as JSON lines")
    args = p.parse_args(argv)
    if args.calls < 4:
        p.error("--calls must be >= 4 (every fourth call is held out)")
    calls = measure(args.model_dir, args.precision, args.cells, args.calls, args.gap_ms / 1e3, args.seed, args.spin)
    if args.calls_out:
        args.calls_out.write_text("".join(json.dumps(asdict(c)) + "\n" for c in calls))
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(json.dumps({"precision": args.precision, "gap_ms": args.gap_ms, "between_calls": "spin" if args.spin else
                      "sleep", "loadavg_1m": load1, **summarise(calls)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
