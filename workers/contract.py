"""A model's input contract: what a client must send, what the server does with it, what is out of range.

Recorded in the manifest when the artifact is written and exposed by every metadata call
(``ListModels``). The preprocessing itself lives in the model (its ``input_mean`` / ``input_std``
buffers, folded into the first layer by the kernels), so clients send raw features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PREPROCESSING: tuple[str, ...] = ("standardize", "scale", "none")
"""standardize: (x - mean) / std from the training split; scale: (x - min) / (max - min) to [0, 1]; none: the
model takes the features as they are."""
FAR_OUT_OF_RANGE = 1.0
"""An input feature is far out of range when it lies more than this many times its training range's width
(or, for a constant feature, its magnitude, at least 1) outside that range."""
MIN_STD = 1e-6
"""Standard deviation (and range width) below which a feature is treated as constant: divided by 1, not ~0."""


@dataclass(frozen=True)
class InputContract:
    """The features a model takes: count, names, dtype, range seen in training, preprocessing applied."""

    features: int
    """Features per sample (> 0)."""
    low: tuple[float, ...]
    """Per-feature minimum on the training split."""
    high: tuple[float, ...]
    """Per-feature maximum on the training split."""
    preprocessing: str = "none"
    """One of PREPROCESSING; applied by the server, so clients send raw features."""
    names: tuple[str, ...] = ()
    """Feature names (empty when the data had none)."""
    dtype: str = "float32"
    """Element type clients send."""

    def __post_init__(self) -> None:
        if self.features <= 0:
            raise ValueError(f"input contract: features={self.features} must be > 0")
        if len(self.low) != self.features or len(self.high) != self.features:
            raise ValueError(f"input contract: {len(self.low)} minima and {len(self.high)} maxima for "
                             f"{self.features} features")
        if self.names and len(self.names) != self.features:
            raise ValueError(f"input contract: {len(self.names)} feature names for {self.features} features")
        if self.preprocessing not in PREPROCESSING:
            raise ValueError(f"input contract: preprocessing={self.preprocessing!r} must be one of {PREPROCESSING}")

    @classmethod
    def from_data(cls, x: np.ndarray, preprocessing: str = "none", names: tuple[str, ...] = ()) -> "InputContract":
        """The contract of training features ``x`` (rows x features)."""
        return cls(int(x.shape[1]), tuple(float(v) for v in x.min(0)), tuple(float(v) for v in x.max(0)),
                   preprocessing, tuple(names))

    def to_json(self) -> dict:
        return {"features": self.features, "names": list(self.names), "dtype": self.dtype,
                "preprocessing": self.preprocessing, "min": list(self.low), "max": list(self.high)}

    @classmethod
    def from_json(cls, d: dict) -> "InputContract":
        return cls(int(d["features"]), tuple(float(v) for v in d["min"]), tuple(float(v) for v in d["max"]),
                   d.get("preprocessing", "none"), tuple(d.get("names", ())), d.get("dtype", "float32"))

    def shift_scale(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The model's (input_mean, input_std) buffers for this contract's preprocessing, from training data ``x``."""
        n = self.features
        if self.preprocessing == "standardize":
            std = x.std(0)
            return x.mean(0).astype(np.float32), np.where(std < MIN_STD, 1.0, std).astype(np.float32)
        if self.preprocessing == "scale":
            low, width = np.asarray(self.low), np.asarray(self.high) - np.asarray(self.low)
            return low.astype(np.float32), np.where(width < MIN_STD, 1.0, width).astype(np.float32)
        return np.zeros(n, np.float32), np.ones(n, np.float32)


class RangeCheck:
    """Counts the features of an input far outside the training range (see FAR_OUT_OF_RANGE)."""

    def __init__(self, contract: InputContract) -> None:
        low, high = np.asarray(contract.low, np.float32), np.asarray(contract.high, np.float32)
        width = high - low
        margin = np.where(width > MIN_STD, width, np.maximum(np.abs(high), 1.0)) * FAR_OUT_OF_RANGE
        self.train_low, self.train_high = low, high
        self.low = low - margin
        self.high = high + margin

    def far_out(self, x: np.ndarray) -> int:
        """How many features of ``x`` (one sample, 1-D) are far out of range."""
        return int(np.count_nonzero((x < self.low) | (x > self.high)))

    def far_out_per_sample(self, x: np.ndarray) -> np.ndarray:
        """For each row of ``x`` ([N, features]), how many of its features are far out of range."""
        return np.count_nonzero((x < self.low) | (x > self.high), axis=1)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` inputs drawn uniformly inside the training range (warm-up and profiling inputs)."""
        rng = np.random.default_rng(seed)
        return rng.uniform(self.train_low, self.train_high, size=(n, len(self.train_low))).astype(np.float32)
