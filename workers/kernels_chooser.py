"""Which kernel runs a (batch size, level): a table measured on this machine.

:func:`measure_kernel_table` times every kernel of a :class:`~workers.kernels.SparseMLP`
for every (batch size, level) on distinct inputs per call and keeps the fastest.
:class:`KernelChooser` answers from that table; a batch size between measured
points uses the nearest measured size at or above it (the largest beyond the
last). Before anything is measured it answers from a small prior. Given the
levels' accuracies, a level whose best kernel is slower than a more accurate
level's is served by that one (``"dense@1.0"``): masking has a cost, and at
large batches the plain dense model beats dense-plus-mask.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from slonn.workers.device import DeviceTimer

if TYPE_CHECKING:
    from slonn.workers.kernels import SparseMLP

DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
PRIOR_GATHER_MAX_BATCH = 4
"""Unmeasured prior: per-sample gather up to this batch size (it wins there by a wide margin), dense above."""
GIVE_UP_FACTOR = 1.5
"""Stop timing a kernel once its first timed call is this many times slower than the best so far."""
DROP_FACTOR = 2.0
"""Stop timing a kernel at larger batch sizes of a level once it was this many times slower than dense:
its costs grow with the batch faster than dense's, so it does not come back (keeps start-up short)."""
SPARSE_MARGIN = 0.1
"""A sparse kernel is chosen over the best dense option only when measured at least this much faster."""
CELL_BUDGET_MS = 30.0
"""After this much timed work on one kernel in one cell (and at least 2 calls), its median is good enough."""


@dataclass
class KernelChooser:
    """Kernel per (batch size, level), from a measured table or, until measured, a prior."""

    table: dict[int, dict[float, str]] = field(default_factory=dict)
    """batch size -> level -> fastest kernel."""
    timings_ms: dict[int, dict[float, dict[str, float]]] = field(default_factory=dict)
    """batch size -> level -> kernel -> median ms (kernels given up on are absent)."""
    levels: tuple[float, ...] = ()
    """Levels of the model."""
    meta: dict = field(default_factory=dict)
    """How the table was measured: threads, device, repeats, inputs."""

    @classmethod
    def default(cls, levels) -> "KernelChooser":
        """Unmeasured chooser (prior only); call :func:`measure_kernel_table` to replace it."""
        return cls(levels=tuple(float(x) for x in levels), meta={"measured": False})

    @property
    def measured(self) -> bool:
        return bool(self.table)

    def choose(self, batch_size: int, level: float) -> str:
        """The table's choice for ``level`` at ``batch_size``: a kernel name, or ``"kernel@run_level"`` when
        running a more accurate level is measured faster (see :func:`measure_kernel_table`); split it
        with :func:`split_choice`."""
        return self._choose(batch_size, level)

    def _choose(self, batch_size: int, level: float) -> str:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not self.table:
            return "gather" if batch_size <= PRIOR_GATHER_MAX_BATCH and level < 1.0 else "dense"
        sizes = sorted(self.table)
        size = next((b for b in sizes if b >= batch_size), sizes[-1])
        row = self.table[size]
        if level in row:
            return row[level]
        nearest = min(row, key=lambda lv: abs(lv - level))
        return row[nearest]

    def to_json(self) -> dict:
        return {
            "measured": self.measured,
            "levels": list(self.levels),
            "meta": dict(self.meta),
            "table": {str(b): {repr(lv): k for lv, k in row.items()} for b, row in self.table.items()},
            "timings_ms": {str(b): {repr(lv): dict(ks) for lv, ks in row.items()}
                           for b, row in self.timings_ms.items()},
        }

    @classmethod
    def from_json(cls, d: dict) -> "KernelChooser":
        return cls(
            table={int(b): {float(lv): str(k) for lv, k in row.items()} for b, row in d.get("table", {}).items()},
            timings_ms={int(b): {float(lv): {str(k): float(ms) for k, ms in ks.items()} for lv, ks in row.items()}
                        for b, row in d.get("timings_ms", {}).items()},
            levels=tuple(float(x) for x in d.get("levels", ())),
            meta=dict(d.get("meta", {})),
        )


def split_choice(choice: str, level: float) -> tuple[str, float]:
    """``"gather"`` -> ("gather", level); ``"dense@1.0"`` -> ("dense", 1.0)."""
    kernel, sep, run_level = choice.partition("@")
    return kernel, (float(run_level) if sep else level)


def is_dense(kernel: str) -> bool:
    """Dense GEMM kernels ("dense", "dense_bf16"): they read every weight whatever the input, so their
    start-up timing holds for every input; a sparse kernel's depends on how many units the inputs keep."""
    return kernel.startswith("dense")


def may_serve(accuracy: dict[float, float], by: float, level: float) -> bool:
    """Level ``by`` may serve ``level`` (promotion): it is a higher keep and at least as accurate on the
    held-out digits. Without an accuracy for ``level`` nothing may serve it."""
    return by > level and level in accuracy and accuracy.get(by, -1.0) >= accuracy[level]


def promote(chooser: KernelChooser, accuracy: dict[float, float] | None = None,
            margin: float = SPARSE_MARGIN) -> None:
    """Fill ``chooser.table`` from its timings: per (batch size, level) the fastest option, where options
    are every kernel of the level and, given ``accuracy``, every kernel of a level at least as accurate.

    Masking costs something (top-k per layer): at large batches, where no sparse kernel beats dense,
    level 0.5's best kernel (dense matmul plus the mask) is slower than the plain dense model at 1.0,
    which is at least as accurate. Serving that level with ``dense@1.0`` keeps the promise (accuracy
    at least the level's, latency no worse than dense) and the response's ``kernel`` says what ran.

    A sparse kernel must beat the best dense option by ``margin`` (a fraction) to be chosen: start-up
    timings are a few calls on a shared machine, and a wrong sparse pick can cost far more than the
    margin (gather at a large batch), while dense is never worse than dense.
    """
    accuracy = accuracy or {}
    for b, row in chooser.timings_ms.items():
        for level, cell in row.items():
            options = {k: ms for k, ms in cell.items()}
            for other, other_cell in row.items():
                if may_serve(accuracy, other, level):
                    options.update({f"{k}@{other!r}": ms for k, ms in other_cell.items()})
            # A dense GEMM on masked inputs runs the plain model's GEMMs plus a top-k per layer: where the
            # plain model (1.0) may serve the level, it is dominated by construction, whatever start-up
            # noise measured (at batch 64 on an AVX2-only EPYC, masked dense at keep 0.5 won calibration
            # and then ran at 0.9x of the plain model in the benchmark).
            for k in [k for k in options if is_dense(k) and "@" not in k and f"{k}@1.0" in options]:
                del options[k]
            if not options:
                continue
            best = min(options, key=options.get)
            dense = [k for k in options if is_dense(split_choice(k, level)[0])]
            if dense and not is_dense(split_choice(best, level)[0]):
                best_dense = min(dense, key=options.get)
                if options[best] > (1.0 - margin) * options[best_dense]:
                    best = best_dense
            chooser.table[b][level] = best


def synthetic_inputs(sparse: "SparseMLP", n: int, seed: int = 0) -> torch.Tensor:
    """``n`` raw inputs drawn around the training distribution (mean + std * N(0, 1))."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, sparse.in_features, generator=gen)
    return (sparse.input_mean.cpu() + sparse.input_std.cpu() * z).to(sparse.device)


def time_kernel(sparse: "SparseMLP", kernel: str, level: float, batches: list[torch.Tensor],
                give_up_ms: float = float("inf")) -> float:
    """Median ms of ``kernel`` over ``batches`` (one warm-up call on the last batch first).

    Stops early, returning the one measurement, when the first timed call exceeds ``give_up_ms``.
    """
    times: list[float] = []
    with torch.inference_mode():
        sparse.forward(batches[-1], level, kernel)
        for x in batches[:-1] if len(batches) > 1 else batches:
            with DeviceTimer(sparse.device) as timer:
                sparse.forward(x, level, kernel)
            times.append(timer.ms)
            if timer.ms > give_up_ms or (len(times) >= 2 and sum(times) > CELL_BUDGET_MS):
                break
    return statistics.median(times)


def measure_kernel_table(sparse: "SparseMLP", levels, batch_sizes=None, repeats: int = 5,
                         inputs: torch.Tensor | None = None,
                         kernels: tuple[str, ...] | None = None,
                         accuracy: dict[float, float] | None = None) -> KernelChooser:
    """Time every kernel for every (batch size, level) on distinct inputs per call; keep the fastest.

    With ``accuracy`` (level -> held-out accuracy), a level may be served by a more accurate level's
    kernel when that is measured faster (:func:`promote`).

    ``inputs`` (n x in, raw features) are cycled through with a fresh offset per
    call; without them, synthetic inputs around the training distribution are used.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    levels = tuple(float(x) for x in levels)
    batch_sizes = tuple(batch_sizes or DEFAULT_BATCH_SIZES)
    kernels = tuple(kernels or sparse.kernels)
    calls = repeats + 1
    need = max(batch_sizes) * calls
    source = "given"
    if inputs is None:
        inputs, source = synthetic_inputs(sparse, need), "synthetic"
    inputs = inputs.to(sparse.device, torch.float32)
    chooser = KernelChooser(levels=levels, meta={
        "measured": True, "threads": torch.get_num_threads(), "device": str(sparse.device),
        "repeats": repeats, "inputs": source, "kernels": list(kernels)})
    offset = 0
    accuracy = {float(lv): float(a) for lv, a in (accuracy or {}).items()}
    dropped: dict[float, set[str]] = {level: set() for level in levels}
    for b in sorted(batch_sizes):
        chooser.table[b], chooser.timings_ms[b] = {}, {}
        row = chooser.timings_ms[b]
        for level in sorted(levels, reverse=True):  # 1.0 first: the plain model's timings are needed below
            cell: dict[str, float] = {}
            plain = row.get(1.0, {}) if may_serve(accuracy, 1.0, level) else {}
            for kernel in kernels:
                if kernel in dropped[level]:
                    continue
                if plain and is_dense(kernel) and (kernel in plain or kernel in dropped[1.0]):
                    # Masked dense is the plain model's GEMMs plus a top-k, and the plain model may serve this
                    # level: it cannot win (promote() drops it), so do not spend start-up time on it.
                    continue
                batches = []
                for _ in range(calls):
                    batches.append(_take(inputs, offset, b))
                    offset += b
                best = min(cell.values(), default=float("inf"))
                # Dense kernels are timed in full whatever came before: the sparse margin and the drop rule
                # compare against their timings, which one early-stopped call would make noisy.
                give_up = float("inf") if is_dense(kernel) else GIVE_UP_FACTOR * best
                cell[kernel] = time_kernel(sparse, kernel, level, batches, give_up)
            row[level] = cell
            dense_ms = cell.get("dense", plain.get("dense"))
            if dense_ms is not None:
                dropped[level] |= {k for k, ms in cell.items() if ms > DROP_FACTOR * dense_ms}
    promote(chooser, accuracy)
    chooser.meta["promoted"] = bool(accuracy)
    chooser.meta["sparse_margin"] = SPARSE_MARGIN
    return chooser


def _take(inputs: torch.Tensor, offset: int, b: int) -> torch.Tensor:
    """Rows offset..offset+b of ``inputs``, wrapping around."""
    n = len(inputs)
    idx = torch.arange(offset, offset + b, device=inputs.device) % n
    return inputs.index_select(0, idx)
