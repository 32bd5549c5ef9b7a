"""Benchmark the level kernels against the plain dense model (docs/kernels.md).

    slonn bench-kernels --json [--threads 1] [--batch-sizes 1,4,16,64] [--repeats 15]

For every batch size and level: median latency of the plain dense torch model
(``SLOAwareMLP.forward(x, 1.0)``, fp32), of every kernel, and of the kernel the
worker's chooser picks (table measured at start-up exactly as the worker does,
on synthetic inputs), and the speedup: the median over rounds of the paired
ratio dense / chosen (``speedup_of_medians`` is the ratio of the two medians).
Calls are interleaved (dense, kernel 1, kernel 2, ...) so drift hits all
alike, and every call gets distinct held-out inputs (the artifact's held-out
rows; the digits for a digits model); beyond them the pool continues with noisy
copies (recorded in the JSON). Accuracy per level and precision is on the
held-out rows. Each row also
gives the batch's union fraction per hidden layer: the share of the layer's
units that some sample of the batch keeps and ReLU leaves positive (non-zero for
GELU/SiLU; mean over
consecutive held-out batches), i.e. the share of the next layer's weight rows
that any exact kernel must read once; it bounds what sparsity can save at that
batch size against a dense GEMM in the same precision.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from slonn.precision import DEFAULT_PRECISION, PRECISIONS, low_precision_of
from slonn.workers.artifact import load_artifact, load_heldout
from slonn.workers.device import DeviceTimer, pick_device
from slonn.workers.kernels import LOW_PRECISION_DTYPES, SparseMLP
from slonn.workers.kernels_chooser import measure_kernel_table, split_choice

NOISE_FRACTION = 1 / 32
"""Std of the noise on the held-out copies that extend the input pool, as a share of each feature's training
range (0.5 for digits' 0..16 pixels); the copies are clipped to that range."""


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="slonn bench-kernels", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=Path("models/digits-mlp"))
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the whole run")
    p.add_argument("--batch-sizes", default="1,4,16,64")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per (batch, level, kernel)")
    p.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS,
                   help="worker weight precision, as `slonn serve --precision`")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print only the JSON document")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        p.error(f"--threads={args.threads} and --repeats={args.repeats} must be >= 1")
    return args


class InputPool:
    """Distinct inputs per call: the held-out rows, then noisy copies of them."""

    def __init__(self, x_test: np.ndarray, device: torch.device, seed: int = 0,
                 low: np.ndarray | None = None, high: np.ndarray | None = None) -> None:
        self.base = torch.from_numpy(x_test).float()
        self.low = torch.from_numpy(np.asarray(x_test.min(0) if low is None else low, np.float32))
        self.high = torch.from_numpy(np.asarray(x_test.max(0) if high is None else high, np.float32))
        self.noise_std = (self.high - self.low) * NOISE_FRACTION
        self.gen = torch.Generator().manual_seed(seed)
        self.device = device
        self.offset = 0
        self.max_used = 0

    def take(self, b: int) -> torch.Tensor:
        """The next ``b`` inputs; round r >= 1 over the held-out set adds fresh noise (clipped to the range)."""
        n = len(self.base)
        idx = torch.arange(self.offset, self.offset + b)
        x = self.base[idx % n].clone()
        noisy = idx >= n
        if noisy.any():
            noise = torch.randn(int(noisy.sum()), x.shape[1], generator=self.gen) * self.noise_std
            x[noisy] = torch.minimum(torch.maximum(x[noisy] + noise, self.low), self.high)
        self.offset += b
        self.max_used = max(self.max_used, self.offset)
        return x.to(self.device)

    def rewind(self) -> None:
        self.offset = 0


def _time(fn, x: torch.Tensor, device: torch.device) -> float:
    with DeviceTimer(device) as timer:
        fn(x)
    return timer.ms


def _bench_cell(model, sparse, pool, b, level, repeats, device, chosen: str, plain_low=None) -> dict:
    """Interleaved timings of dense and every kernel at one (batch, level); each call on fresh inputs.

    ``chosen`` is the chooser's pick; when it runs another level (``"dense@1.0"``) it is timed as its
    own series in the same interleaving. ``plain_low`` (the plain model in the half precision) joins
    the interleaving as ``"plain_dense_low"``: timed apart, its weights stay in cache between calls
    and it looks ~40% faster than it is beside the others.
    """
    fns = {"plain_dense": lambda x: model(x, 1.0)}
    if plain_low is not None:
        dtype = next(plain_low.parameters()).dtype
        fns["plain_dense_low"] = lambda x: plain_low(x.to(dtype), 1.0)
    fns |= {k: (lambda kk: lambda x: sparse.forward(x, level, kk))(k) for k in sparse.kernels}
    kernel, run_level = split_choice(chosen, level)
    if chosen not in fns:
        fns[chosen] = lambda x: sparse.forward(x, run_level, kernel)
    times: dict[str, list[float]] = {k: [] for k in fns}
    pool.rewind()
    for name, fn in fns.items():  # warm-up
        fn(pool.take(b))
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_time(fn, pool.take(b), device))
    return times


def _plain_model_in(model, low: str, device):
    """The plain dense model with weights in ``low``, computing in that dtype: the fair yardstick for a
    half kernel (on CPUs with AMX a bf16 GEMM runs several times faster than fp32)."""
    half = type(model)(model.arch).to(device)
    half.load_state_dict(model.state_dict())
    return half.to(LOW_PRECISION_DTYPES[low]).eval()


def _accuracy(model, sparse, x, y, levels) -> dict:
    out = {}
    for level in levels:
        row = {"reference": float((model(x, level).argmax(1) == y).float().mean())}
        for k in sparse.kernels:
            row[k] = float((sparse.forward(x, level, k).argmax(1) == y).float().mean())
        out[repr(level)] = row
    return out


def _union_fractions(model, x: torch.Tensor, b: int, level: float) -> list[float]:
    """Per hidden layer: mean over consecutive batches of ``b`` inputs of the share of units that some
    sample of the batch keeps with a positive value (the weight rows the next layer must read)."""
    n = (len(x) // b) * b
    acts = model.hidden_activations(x[:n], level)
    relu = model.arch.activation == "relu"
    return [round(float(((z > 0) if relu else (z != 0)).reshape(-1, b, z.shape[-1]).any(1).float().mean()), 3) for z in acts]


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model, manifest = load_artifact(args.model_dir, device)
    low = low_precision_of(args.precision)
    sparse = SparseMLP.from_model(model, device, low_precision=low)
    x_held, y_held = load_heldout(args.model_dir)
    contract = manifest.contract
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    t0 = time.perf_counter()
    # exactly what the worker runs at start-up
    chooser = measure_kernel_table(sparse, manifest.levels, accuracy=manifest.accuracy)
    calibration_s = time.perf_counter() - t0
    pool = InputPool(x_held, device, low=np.array(contract.low), high=np.array(contract.high))
    rows = []
    with torch.inference_mode():
        x_test = torch.from_numpy(x_held).to(device)
        y_test = torch.from_numpy(y_held).to(device)
        accuracy = _accuracy(model, sparse, x_test, y_test, manifest.levels)
        dense_acc = float((model(x_test, 1.0).argmax(1) == y_test).float().mean())
        plain_low = None if low is None else _plain_model_in(model, low, device)
        for b in batch_sizes:
            for level in manifest.levels:
                chosen = chooser.choose(b, level)
                kernel, run_level = split_choice(chosen, level)
                series = _bench_cell(model, sparse, pool, b, level, args.repeats, device, chosen, plain_low)
                cell = {k: statistics.median(v) for k, v in series.items()}
                dense_ms = cell.pop("plain_dense")
                dense_low_ms = cell.pop("plain_dense_low", None)
                best = min(cell, key=cell.get)
                # Paired: dense and the chosen kernel ran back to back in each round, so the median of the
                # per-round ratios cancels the machine's drift that a ratio of two medians keeps.
                paired = statistics.median(d / c for d, c in zip(series["plain_dense"], series[chosen]))
                row = {"batch": b, "level": level, "dense_ms": round(dense_ms, 4), "chosen_kernel": chosen,
                       "chosen_ms": round(cell[chosen], 4), "speedup": round(paired, 2),
                       "speedup_of_medians": round(dense_ms / cell[chosen], 2),
                       "best_kernel_in_bench": best, "kernels_ms": {k: round(v, 4) for k, v in cell.items()},
                       "accuracy": accuracy[repr(run_level)][kernel],
                       "accuracy_minus_dense_points": round(100 * (accuracy[repr(run_level)][kernel] - dense_acc),
                                                            2),
                       "union_fraction_per_layer": _union_fractions(model, x_test, b, level)}
                if low is not None and kernel.endswith(f"_{low}"):
                    row["dense_same_precision_ms"] = round(dense_low_ms, 4)
                    row["speedup_vs_same_precision_dense"] = round(
                        statistics.median(d / c for d, c in zip(series["plain_dense_low"], series[chosen])), 2)
                rows.append(row)
    return {
        "benchmark": "kernels",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": torch.multiprocessing.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "threads": torch.get_num_threads(), "device": str(device)},
        "model": {"dir": str(args.model_dir), "name": manifest.name, "in_features": manifest.arch.in_features,
                  "hidden": list(manifest.arch.hidden), "activation": manifest.arch.activation,
                  "levels": list(manifest.levels)},
        "precision": args.precision,
        "low_precision": low,
        "repeats": args.repeats,
        "inputs": {"source": "the artifact's held-out rows, distinct per call within a series",
                   "held_out": int(len(x_held)), "max_inputs_per_series": pool.max_used,
                   "noisy_copies_used": pool.max_used > len(x_held),
                   "noise_std_share_of_range": NOISE_FRACTION},
        "calibration": {"seconds": round(calibration_s, 2), "table": chooser.to_json()},
        "dense_accuracy": dense_acc,
        "accuracy": accuracy,
        "rows": rows,
    }


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'batch':>5} {'level':>5} {'dense_ms':>9} {'chosen':>12} {'chosen_ms':>9} {'ratio':>6} {'acc':>6}")
    for r in result["rows"]:
        print(f"{r['batch']:>5} {r['level']:>5} {r['dense_ms']:>9.3f} {r['chosen_kernel']:>12} "
              f"{r['chosen_ms']:>9.3f} {r['speedup']:>6.2f} {r['accuracy']:>6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
