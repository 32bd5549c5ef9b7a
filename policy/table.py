"""The latency table the planner reads in O(1).

The learner (``policy/learner.py``) fits a model off the hot path and
publishes a new immutable :class:`LatencyTable`; the planner only indexes it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class LatencyTable:
    """Predicted exec ms per (contention bucket, level, batch size).

    ``safe_ms`` is an upper prediction (what batch and level choices use);
    ``mean_ms`` the expected value (whether a request can still make its
    deadline at all, reporting, and the simulator's mean).
    """

    levels: tuple[float, ...]
    """Keep fractions, most accurate (largest) first."""
    max_batch: int
    """Batch sizes 1..max_batch are covered."""
    contention_edges: tuple[float, ...]
    """Upper edges of the contention buckets but the last (which is open): len = n_buckets - 1."""
    safe_ms: np.ndarray
    """shape (n_buckets, n_levels, max_batch)."""
    mean_ms: np.ndarray
    """shape (n_buckets, n_levels, max_batch)."""
    # Derived in __post_init__. Python lists: indexing them is faster than numpy scalar indexing on the hot path.
    _safe: list = field(init=False, repr=False, compare=False)
    _mean: list = field(init=False, repr=False, compare=False)
    _level_index: dict = field(init=False, repr=False, compare=False)
    _fastest: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shape = (len(self.contention_edges) + 1, len(self.levels), self.max_batch)
        for name in ("safe_ms", "mean_ms"):
            arr = getattr(self, name)
            if arr.shape != shape:
                raise ValueError(f"LatencyTable.{name} has shape {arr.shape}, expected {shape}")
        if list(self.levels) != sorted(self.levels, reverse=True):
            raise ValueError(f"LatencyTable.levels={self.levels} must be sorted most accurate (largest) first")
        object.__setattr__(self, "_safe", self.safe_ms.tolist())
        object.__setattr__(self, "_mean", self.mean_ms.tolist())
        object.__setattr__(self, "_level_index", {lv: i for i, lv in enumerate(self.levels)})
        object.__setattr__(self, "_fastest", {})

    def __reduce__(self) -> tuple:
        """Pickle (the learner's refit process sends tables back) through __init__, which derives the rest:
        the default way sets each field on a frozen instance, which fails once mypyc compiles this class."""
        return (LatencyTable, (self.levels, self.max_batch, self.contention_edges, self.safe_ms, self.mean_ms))

    def bucket(self, contention: float) -> int:
        """Index of the contention bucket holding ``contention``."""
        return bisect.bisect_left(self.contention_edges, contention)

    def level_index(self, level: float) -> int:
        return self._level_index[level]

    def safe(self, bucket: int, level_index: int, batch_size: int) -> float:
        """Upper-quantile exec ms; batch sizes beyond max_batch are not plannable."""
        return self._safe[bucket][level_index][batch_size - 1]

    def fastest_index(self, bucket: int, accuracy: tuple[float, ...], min_accuracy: float) -> int:
        """Index of the level with the lowest batch-1 safe latency among those whose accuracy meets the floor
        (the most accurate level when none does). Memoised: the table is immutable and this is on every
        admission and expiry check."""
        key = (bucket, accuracy, min_accuracy)
        i = self._fastest.get(key)
        if i is None:
            allowed = [j for j, acc in enumerate(accuracy) if acc >= min_accuracy]
            if not allowed:
                i = max(range(len(accuracy)), key=accuracy.__getitem__)
            else:
                i = min(allowed, key=lambda j: self._safe[bucket][j][0])
            self._fastest[key] = i
        return i

    def safe_rows(self, bucket: int) -> list[list[float]]:
        """``rows[level_index][batch_size - 1]`` = safe ms, for loops that read many cells."""
        return self._safe[bucket]

    def mean(self, bucket: int, level_index: int, batch_size: int) -> float:
        return self._mean[bucket][level_index][batch_size - 1]

    def mean_rows(self, bucket: int) -> list[list[float]]:
        """``rows[level_index][batch_size - 1]`` = mean ms. The planner's binary search needs them non-decreasing
        in batch size, which the builders guarantee (``LatencyModel.to_table``'s running max, ``constant`` with
        ``per_item_ms >= 0``, ``scheduler.latency``'s linear table) and this class does not check."""
        return self._mean[bucket]

    @classmethod
    def constant(cls, levels: tuple[float, ...], max_batch: int, per_item_ms: float, fixed_ms: float = 0.0,
                 ) -> "LatencyTable":
        """A table where latency = fixed + per_item * batch * level (tests, a cold start with no profile)."""
        lv = np.asarray(levels)[:, None]
        b = np.arange(1, max_batch + 1)[None, :]
        ms = (fixed_ms + per_item_ms * b * lv)[None, :, :]
        return cls(tuple(levels), max_batch, (), ms.copy(), ms.copy())
