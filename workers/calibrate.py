"""Calibration: an SLO-aware model's held-out accuracy at each level, as it is (no training).

At level 1.0 the model is the user's original network (the preprocessing the server applies, then the same
Linear layers and activation), so its logits there are the original's, bit for bit in fp32.
"""

from __future__ import annotations

import numpy as np
import torch

from slonn.workers.model import SLOAwareMLP

EVAL_ROWS = 4096
"""Rows per forward when evaluating: bounds the activations' memory on large held-out sets."""


def logits(model: SLOAwareMLP, x: np.ndarray, keep: float, rows: int = EVAL_ROWS) -> torch.Tensor:
    """The model's fp32 logits on ``x`` at level ``keep``, ``rows`` at a time."""
    model.eval()
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    with torch.inference_mode():
        return torch.cat([model(xt[i:i + rows], keep) for i in range(0, len(xt), rows)])


def accuracy_per_level(model: SLOAwareMLP, x: np.ndarray, y: np.ndarray,
                       levels: tuple[float, ...]) -> dict[float, float]:
    """Held-out accuracy of ``model`` at each of ``levels``."""
    return {float(lv): float((logits(model, x, lv).argmax(-1).numpy() == y).mean()) for lv in levels}


def first_level_within(curve: dict[float, float], reference: float, max_drop: float) -> float | None:
    """The smallest level whose accuracy in ``curve`` is within ``max_drop`` of ``reference``, or None."""
    ok = [lv for lv, acc in curve.items() if acc >= reference - max_drop - 1e-12]
    return min(ok) if ok else None
