"""Exec-latency model: (level, batch size, contention) -> ms, with a safe upper prediction.

Model (see ``docs/latency-model.md``): scikit-learn's weighted ``Ridge`` on
``log(ms)`` over engineered features

- a smooth part: ``zb, zl, zb*zl, zb**2`` with ``zb = log2(batch)/log2(max
  batch knot)`` and ``zl = log2(level)`` scaled to [-1, 0];
- a cell part: the tensor product of linear "hat" bases in ``log2(batch)`` (knots
  at the profiled batch sizes) and ``log2(level)`` (knots at the levels). On a
  profiled grid this is bilinear interpolation of log-latency between cells,
  so a kernel switch at some batch size is learned, not smoothed away; between
  knots it interpolates, beyond the last knot it extrapolates the last segment
  (a power law in batch);
- a contention part: smooth increasing terms ``log1p(c)``, ``c`` and
  ``log(max(1, c + 1/n_cpus))`` (:func:`contention_terms`), alone and times
  ``zb`` and ``zl``: the slowdown is multiplicative, may differ by batch size
  and level, and extrapolates smoothly where the profile has few rows.

Safe prediction: split-conformal in log space. Out-of-fold residuals
``log(y) - log(mean)`` (K-fold) give, per contention group (quantile bins of
the observed contention, if a bin has enough rows, else all rows), the ``quantile``-th residual
``q``; ``safe = mean * exp(max(q, 0))``.

No pickle: :meth:`LatencyModel.save` writes the rows as CSV plus a JSON of
hyper-parameters; :meth:`LatencyModel.load` refits from them (deterministic).
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold
from threadpoolctl import threadpool_limits

from slonn.policy.table import LatencyTable
from slonn.precision import DEFAULT_PRECISION, low_precision_of

PROFILE_CSV = "latency_profile.csv"
"""The profile of the default precision's kernels; see :func:`profile_csv_name`."""
MODEL_JSON = "latency_model.json"
DEFAULT_CONTENTION_EDGES: tuple[float, ...] = (0.1, 0.3, 0.6, 0.9, 1.25, 1.75)
"""Upper edges of the contention buckets (others' runnable tasks per CPU); the last bucket is open."""


@dataclass(frozen=True)
class LatencySample:
    """One measured batch: what the model learns from."""

    level: float
    batch_size: int
    contention: float
    exec_ms: float
    kernel: str = ""
    """Kernel that ran (informational; not a feature)."""


@dataclass(frozen=True)
class LatencyModelConfig:
    """Hyper-parameters (saved as JSON beside the profile)."""

    alpha: float = 0.01
    """Ridge penalty (> 0): keeps cells with few rows close to the smooth part."""
    contention_alpha: float = 3.0
    """Ridge penalty on the contention terms (> 0): no slowdown unless the rows show one. Their slope is
    pinned by how much contention *varies* in the rows, and rows that barely vary it (the quiet rows a cold
    start or the online learner begins from, at 0-0.1) fit noise at ``alpha``: from the quiet rows of an
    fp32 profile the model extrapolated a 2.0-3.5x slowdown to contention 1.5, where the measured one was
    0.92x. Over ten profiles (``python -m bench.eval_latency --online``) the quiet-only
    table's MAPE on the busiest setting fell from 19-241% to 11-67%; with 200 live rows it is unchanged
    (10-39%), and a full profile's five co-runner settings outweigh the penalty (held-out MAPE moved by
    -0.26 to +0.24 points). The price is some shrinkage where rows are few: a synthetic 1.93x slowdown
    over 560 rows is fitted as 1.83x (1.99x at ``alpha``); the safe quantile absorbs the rest."""
    quantile: float = 0.99
    """Coverage of the safe prediction, in (0.5, 1)."""
    contention_groups: int = 4
    """Groups (>= 1; edges at quantiles of the observed contention) with their own residual quantile."""
    n_cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    """CPUs of the machine the signal was measured on (the oversubscription kink of the contention terms)."""
    folds: int = 5
    """K for the out-of-fold residuals behind the safe prediction (>= 2)."""
    min_group_rows: int = 40
    """A contention group needs this many rows for its own residual quantile, else the global one."""
    seed: int = 0
    """Fold shuffling seed."""

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ValueError(f"LatencyModelConfig.alpha={self.alpha} must be > 0")
        if not self.contention_alpha > 0:
            raise ValueError(f"LatencyModelConfig.contention_alpha={self.contention_alpha} must be > 0")
        if not 0.5 < self.quantile < 1:
            raise ValueError(f"LatencyModelConfig.quantile={self.quantile} must be in (0.5, 1), e.g. 0.99")
        if self.contention_groups < 1 or self.folds < 2 or self.n_cpus < 1:
            raise ValueError(f"LatencyModelConfig: contention_groups={self.contention_groups} and n_cpus="
                             f"{self.n_cpus} must be >= 1, folds={self.folds} >= 2")


# --------------------------------------------------------------------------- rows


def rows_to_arrays(rows: Sequence[LatencySample]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    level = np.fromiter((r.level for r in rows), float, len(rows))
    batch = np.fromiter((r.batch_size for r in rows), float, len(rows))
    cont = np.fromiter((r.contention for r in rows), float, len(rows))
    ms = np.fromiter((r.exec_ms for r in rows), float, len(rows))
    return level, batch, cont, ms


def write_rows_csv(path: Path, rows: Iterable[LatencySample], extra: Sequence[dict] | None = None) -> None:
    """Rows as CSV (``level,batch_size,contention,exec_ms,kernel`` plus any ``extra`` columns per row)."""
    rows = list(rows)
    extra_keys = list(extra[0].keys()) if extra else []
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["level", "batch_size", "contention", "exec_ms", "kernel", *extra_keys])
        for i, r in enumerate(rows):
            w.writerow([r.level, r.batch_size, f"{r.contention:.4f}", f"{r.exec_ms:.4f}", r.kernel,
                        *(extra[i][k] for k in extra_keys)])


def read_rows_csv(path: Path, with_extra: bool = False):
    """Rows from a profile CSV; with ``with_extra`` also the list of full dicts (e.g. ``intensity``)."""
    rows, dicts = [], []
    with open(path, newline="") as f:
        for d in csv.DictReader(f):
            rows.append(LatencySample(float(d["level"]), int(d["batch_size"]), float(d["contention"]),
                                      float(d["exec_ms"]), d.get("kernel", "") or ""))
            dicts.append(d)
    return (rows, dicts) if with_extra else rows


def profile_niceness(rows: Iterable[dict]) -> list[int]:
    """The worker niceness(es) a profile was taken at (its ``worker_nice`` column; [] for profiles without
    it). ValueError, naming the column, if a value is not a whole number."""
    taken = {d.get("worker_nice") for d in rows} - {None, ""}
    try:
        return sorted(int(v) for v in taken)
    except ValueError:
        raise ValueError(f"worker_nice values {sorted(taken)} are not whole numbers") from None


# --------------------------------------------------------------------------- features


def hat_basis(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Linear B-spline basis (n, K) on sorted ``knots``; the end segments extend linearly beyond the knots."""
    x = np.asarray(x, float)
    k = len(knots)
    out = np.zeros((len(x), k))
    if k == 1:
        out[:, 0] = 1.0
        return out
    i = np.clip(np.searchsorted(knots, x, side="right") - 1, 0, k - 2)
    t = (x - knots[i]) / (knots[i + 1] - knots[i])
    rows = np.arange(len(x))
    out[rows, i] = 1.0 - t
    out[rows, i + 1] = t
    return out


def contention_terms(c: np.ndarray, n_cpus: int) -> np.ndarray:
    """Smooth, increasing functions of contention (others' runnable tasks per CPU): ``log1p(c)``, ``c`` and
    ``log(max(1, c + 1/n_cpus))`` — the slowdown of a one-thread job once the CPUs are oversubscribed."""
    return np.stack([np.log1p(c), c, np.log(np.maximum(1.0, c + 1.0 / n_cpus))], axis=1)


@dataclass(frozen=True)
class _Featurizer:
    """Knots fixed at fit time; maps (level, batch, contention) to the design matrix."""

    level_knots: np.ndarray
    batch_knots: np.ndarray
    group_edges: np.ndarray
    n_cpus: int
    contention_scale: float = 1.0
    """The contention columns are multiplied by this: one ridge penalty ``alpha`` on them then acts as
    ``alpha / contention_scale**2`` on the unscaled terms."""

    @classmethod
    def from_data(cls, level, batch, cont, groups: int, n_cpus: int,
                  contention_scale: float = 1.0, knot_rows: int | None = None) -> "_Featurizer":
        """Knots at the levels and batch sizes of the first ``knot_rows`` rows (all when None); contention
        groups from every row."""
        lk = np.unique(np.log2(level[:knot_rows]))
        bk = np.unique(np.log2(batch[:knot_rows]))
        edges = np.unique(np.quantile(np.maximum(cont, 0.0), np.linspace(0, 1, groups + 1)[1:-1]))
        return cls(lk, bk, edges, n_cpus, contention_scale)

    def _scaled(self, level, batch):
        zb = np.log2(batch) / max(self.batch_knots[-1], 1.0)
        zl = np.log2(level) / max(-self.level_knots[0], 1.0)
        return zb, zl

    def __call__(self, level, batch, cont) -> np.ndarray:
        level = np.asarray(level, float)
        batch = np.asarray(batch, float)
        cont = np.maximum(np.asarray(cont, float), 0.0)
        zb, zl = self._scaled(level, batch)
        smooth = np.stack([zb, zl, zb * zl, zb * zb], axis=1)
        hb = hat_basis(np.log2(batch), self.batch_knots)
        hl = hat_basis(np.log2(level), self.level_knots)
        cells = (hl[:, :, None] * hb[:, None, :]).reshape(len(batch), -1)
        ct = contention_terms(cont, self.n_cpus) * self.contention_scale
        conts = np.concatenate([ct, ct * zb[:, None], ct * zl[:, None]], axis=1)
        return np.concatenate([smooth, cells, conts], axis=1)

    @property
    def n_groups(self) -> int:
        return len(self.group_edges) + 1

    def group(self, cont) -> np.ndarray:
        """Conformal group of each contention value (bins between quantiles of the fitted contention)."""
        return np.searchsorted(self.group_edges, np.asarray(cont, float), side="right")


def weighted_quantile(x: np.ndarray, q: float, w: np.ndarray | None = None) -> float:
    """Conservative weighted quantile (finite-sample: the ceil((n+1)q)-th of n for unit weights)."""
    order = np.argsort(x)
    x = x[order]
    w = np.ones_like(x) if w is None else np.asarray(w, float)[order]
    target = q * (w.sum() + w.mean())  # +1 pseudo-row: split-conformal's (n+1) correction
    i = int(np.searchsorted(np.cumsum(w), target, side="left"))
    return float(x[min(i, len(x) - 1)])


# --------------------------------------------------------------------------- ridge


def _ridge(alpha: float) -> Ridge:
    """scikit-learn's Ridge (unpenalised intercept, per-row weights), Cholesky solver."""
    return Ridge(alpha=alpha, solver="cholesky")


# --------------------------------------------------------------------------- model


@dataclass
class LatencyModel:
    """Fit with :meth:`fit`; predict vectorised; export a :class:`LatencyTable`."""

    config: LatencyModelConfig = field(default_factory=LatencyModelConfig)
    rows: list[LatencySample] = field(default_factory=list)
    _feat: _Featurizer | None = field(default=None, init=False, repr=False)
    _ridge: Ridge | None = field(default=None, init=False, repr=False)
    _q: np.ndarray | None = field(default=None, init=False, repr=False)
    _oof_log_resid: np.ndarray | None = field(default=None, init=False, repr=False)
    _c_max: float = field(default=0.0, init=False, repr=False)

    def fit(self, rows: Sequence[LatencySample], weights: np.ndarray | None = None,
            knot_rows: int | None = None) -> "LatencyModel":
        """Fit on ``rows`` (optional per-row ``weights``, e.g. live rows outweighing the profile).

        ``knot_rows``: the cells' knots are the levels and batch sizes of the first ``knot_rows`` rows (the
        profile, ahead of the live rows), or of all rows (None, or no such row). Live traffic runs nearly
        every batch size from 1 to the maximum: a knot for each put a cell on a handful of noisy live rows
        (weighted up), and the mean followed single batches (on synthetic rows, 11.1% against 4.4% MAPE to
        the truth, with 64 knots against the profile's 12)."""
        if len(rows) < 2 * self.config.folds:
            raise ValueError(f"LatencyModel.fit needs >= {2 * self.config.folds} rows, got {len(rows)}")
        level, batch, cont, ms = rows_to_arrays(rows)
        if (ms <= 0).any() or (batch < 1).any() or (level <= 0).any():
            raise ValueError("LatencyModel.fit: exec_ms and level must be > 0 and batch_size >= 1 in every row")
        w = np.ones(len(rows)) if weights is None else np.asarray(weights, float)
        self.rows = list(rows)
        self._feat = _Featurizer.from_data(level, batch, cont, self.config.contention_groups, self.config.n_cpus,
                                           math.sqrt(self.config.alpha / self.config.contention_alpha),
                                           knot_rows or None)
        x, y = self._feat(level, batch, cont), np.log(ms)
        self._ridge, self._q, self._oof_log_resid = self._fit_with_residual_quantiles(x, y, w, cont)
        self._c_max = float(np.quantile(cont, 0.95))
        return self

    def _fit_with_residual_quantiles(self, x, y, w, cont) -> tuple[Ridge, np.ndarray, np.ndarray]:
        """The ridge on all rows, per contention group the ``quantile``-th out-of-fold log-residual (the
        global one where a group is small), and the out-of-fold log-residuals themselves."""
        folds = KFold(self.config.folds, shuffle=True, random_state=self.config.seed).split(x)
        resid = np.empty_like(y)
        # One BLAS thread: a refit runs beside the event loop, and multi-threaded BLAS under CPU
        # contention (exactly when the learner refits) took 100-200 ms instead of a few ms.
        with threadpool_limits(limits=1):
            for train, test in folds:
                m = _ridge(self.config.alpha).fit(x[train], y[train], sample_weight=w[train])
                resid[test] = y[test] - m.predict(x[test])
            model = _ridge(self.config.alpha).fit(x, y, sample_weight=w)
        return model, self._group_quantiles(resid, w, cont), resid

    def _group_quantiles(self, resid, w, cont) -> np.ndarray:
        q_all = weighted_quantile(resid, self.config.quantile, w)
        groups = self._feat.group(cont)
        q = np.full(self._feat.n_groups, q_all)
        for g in range(len(q)):
            sel = groups == g
            if sel.sum() >= self.config.min_group_rows:
                q[g] = weighted_quantile(resid[sel], self.config.quantile, w[sel])
        return np.maximum(q, 0.0)

    def out_of_fold_mean(self) -> np.ndarray:
        """Each fitted row's mean prediction from the fold model that did not see it (``config.folds``-fold,
        the split the safe quantile is taken over), in the order of ``rows``."""
        self._check()
        return np.array([r.exec_ms for r in self.rows]) * np.exp(-self._oof_log_resid)

    @property
    def fitted(self) -> bool:
        return self._ridge is not None

    def _check(self) -> None:
        if self._ridge is None:
            raise RuntimeError("LatencyModel is not fitted: call fit(rows) or LatencyModel.load(dir)")

    def predict_mean(self, level, batch, contention) -> np.ndarray:
        """Expected exec ms (broadcast over array-likes)."""
        self._check()
        level, batch, contention = np.broadcast_arrays(np.asarray(level, float), np.asarray(batch, float),
                                                       np.asarray(contention, float))
        x = self._feat(level.ravel(), batch.ravel(), contention.ravel())
        return np.exp(self._ridge.predict(x)).reshape(level.shape)

    def predict_safe(self, level, batch, contention) -> np.ndarray:
        """Upper prediction (``config.quantile`` coverage) of exec ms; always >= predict_mean."""
        mean = self.predict_mean(level, batch, contention)
        groups = self._feat.group(np.broadcast_to(np.asarray(contention, float), mean.shape).ravel())
        return mean * np.exp(self._q[groups]).reshape(mean.shape)

    def bucket_points(self, contention_edges: Sequence[float], kind: str = "safe") -> np.ndarray:
        """Contention at which each table bucket is evaluated. ``safe``: the bucket's upper edge (the
        prediction holds for anything in the bucket); ``mean``: its midpoint (an unbiased typical value).
        The last, open bucket ends at the larger of its lower edge and the 95th percentile of the
        contention seen in fit."""
        edges = [float(e) for e in contention_edges]
        upper = np.array([*edges, max(edges[-1], self._c_max) if edges else self._c_max])
        if kind == "safe":
            return upper
        lower = np.array([0.0, *edges])
        return (lower + upper) / 2

    def to_table(self, levels: Sequence[float], max_batch: int,
                 contention_edges: Sequence[float] = DEFAULT_CONTENTION_EDGES) -> LatencyTable:
        """Predictions on (bucket, level, 1..max_batch) at :meth:`bucket_points`, made non-decreasing in
        batch size; the safe ones also in contention (a busier bucket never plans a batch as faster), the mean
        ones not: a running max over buckets carried a quiet bucket's slower mean, or a bump of the fitted
        curve, into busier buckets (held-out table MAPE 13.6% against the model's 9.3% on an fp32 profile,
        11.2% without it); ``safe_ms >= mean_ms``, the max of the two taken before the
        running max over buckets, so that a quiet bucket's mean cannot poke above a busier bucket's safe."""
        self._check()
        levels = tuple(sorted(levels, reverse=True))
        c_safe = self.bucket_points(contention_edges, "safe")[:, None, None]
        c_mean = self.bucket_points(contention_edges, "mean")[:, None, None]
        lv = np.asarray(levels, float)[None, :, None]
        b = np.arange(1, max_batch + 1, dtype=float)[None, None, :]
        mean = np.maximum.accumulate(self.predict_mean(lv, b, c_mean), axis=2)
        safe = np.maximum(np.maximum.accumulate(self.predict_safe(lv, b, c_safe), axis=2), mean)
        return LatencyTable(levels, max_batch, tuple(float(e) for e in contention_edges),
                            np.maximum.accumulate(safe, axis=0), mean)

    def describe(self) -> dict:
        """Knots and residual quantiles, for logs and docs."""
        self._check()
        return {"rows": len(self.rows), "config": asdict(self.config),
                "level_knots": (2 ** self._feat.level_knots).round(4).tolist(),
                "batch_knots": (2 ** self._feat.batch_knots).round(2).tolist(),
                "contention_group_edges": self._feat.group_edges.round(4).tolist(),
                "safe_ratio_per_group": np.exp(self._q).round(4).tolist()}

    # ----------------------------------------------------------------- persistence (no pickle)

    def save(self, directory: Path) -> Path:
        """Write the rows (CSV) and hyper-parameters (JSON) into ``directory``; returns the JSON path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_rows_csv(directory / PROFILE_CSV, self.rows)
        path = directory / MODEL_JSON
        path.write_text(json.dumps({"config": asdict(self.config), "profile_csv": PROFILE_CSV,
                                    "rows": len(self.rows), "format_version": 1}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> "LatencyModel":
        """Refit from ``latency_profile.csv`` (+ ``latency_model.json`` hyper-parameters if present)."""
        directory = Path(directory)
        csv_path = directory / PROFILE_CSV
        if not csv_path.exists():
            raise FileNotFoundError(f"{csv_path} not found: run `slonn profile --model-dir {directory}` first")
        config = LatencyModelConfig()
        if (directory / MODEL_JSON).exists():
            saved = json.loads((directory / MODEL_JSON).read_text())["config"]
            # Keys this version does not know (a JSON written by a newer one) are left out: defaults stand.
            known = {f.name for f in fields(LatencyModelConfig)}
            config = LatencyModelConfig(**{k: v for k, v in saved.items() if k in known})
        return cls(config).fit(read_rows_csv(csv_path))


def profile_csv_name(precision: str = DEFAULT_PRECISION) -> str:
    """File name of the latency profile for workers serving in ``precision``: each precision has its own
    kernels and so its own latencies (``latency_profile.csv`` for the default, else
    ``latency_profile-<precision>.csv``)."""
    low_precision_of(precision)  # ValueError naming precision
    return PROFILE_CSV if precision == DEFAULT_PRECISION else f"latency_profile-{precision}.csv"


def foreign_kernels(rows: Iterable[LatencySample], precision: str) -> set[str]:
    """Kernels in ``rows`` that workers in ``precision`` do not have (a profile taken for another
    precision, e.g. one written before the default became bf16)."""
    low = low_precision_of(precision)
    out = set()
    for k in {r.kernel.partition("@")[0] for r in rows}:
        suffix = k.rpartition("_")[2] if "_" in k else None
        if suffix is not None and suffix != low:
            out.add(k)
    return out


def mape(pred: np.ndarray, actual: np.ndarray) -> float:
    """Mean absolute percentage error, in %."""
    return float(np.mean(np.abs(pred - actual) / actual) * 100.0) if len(actual) else math.nan
