"""scikit-learn's digits set (1,797 real 8x8 images; ships with the package, no download).

One deterministic split shared by training, the demo and the replay, so the
inputs the load generator sends are never ones the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DigitsSplit:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    seed: int
    test_fraction: float

    def describe(self) -> dict:
        return {
            "name": "sklearn.datasets.load_digits",
            "split_seed": self.seed,
            "test_fraction": self.test_fraction,
            "train": int(len(self.y_train)),
            "test": int(len(self.y_test)),
        }


def load_split(seed: int = 0, test_fraction: float = 0.3) -> DigitsSplit:
    """Stratified train/held-out split of the digits; features are raw pixels 0..16 as float32."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return DigitsSplit(x_train, y_train, x_test, y_test, seed, test_fraction)
