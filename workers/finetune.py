"""SLO-aware fine-tuning: every mini-batch runs at a level drawn at random, distilled from the dense original.

The teacher is the imported model at level 1.0, frozen; its logits on the training split are computed once.
The loss mixes the KL divergence to the teacher's softened outputs (temperature T, scaled by T^2) with the
cross-entropy on the labels, so low levels learn to reproduce the original rather than to drift from it.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from slonn.workers.calibrate import logits
from slonn.workers.model import SLOAwareMLP

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune an imported model for its levels."""

    epochs: int = 5
    """Passes over the training split (> 0)."""
    batch_size: int = 128
    """Mini-batch size (> 0)."""
    lr: float = 3e-4
    """Adam learning rate (cosine-annealed to 0 over the run)."""
    temperature: float = 2.0
    """Distillation temperature (> 0)."""
    distill_weight: float = 0.9
    """Weight of the distillation term; the cross-entropy on the labels gets the rest (in [0, 1])."""
    seed: int = 0
    """Seed of the level draws and the batch order."""

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0:
            raise ValueError(f"fine-tune epochs={self.epochs} and batch_size={self.batch_size} must be > 0")
        if not self.lr > 0 or not self.temperature > 0:
            raise ValueError(f"fine-tune lr={self.lr} and temperature={self.temperature} must be > 0")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"fine-tune distill_weight={self.distill_weight} must be in [0, 1]")


def finetune(model: SLOAwareMLP, x: np.ndarray, y: np.ndarray, levels: tuple[float, ...],
             cfg: FinetuneConfig) -> float:
    """Fine-tune ``model`` in place on (x, y) for ``levels``; returns the seconds it took."""
    start = time.perf_counter()
    teacher = logits(model, x, 1.0)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = cfg.epochs * ((len(xt) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t, w = cfg.temperature, cfg.distill_weight
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            keep = rng.choice(levels)
            out = model(xt[idx], keep)
            kl = F.kl_div(F.log_softmax(out / t, -1), F.log_softmax(teacher[idx] / t, -1), log_target=True,
                          reduction="batchmean") * (t * t)
            loss = w * kl + (1.0 - w) * F.cross_entropy(out, yt[idx]) if w < 1.0 else kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log.info("fine-tune epoch %d/%d loss %.4f (%.1fs)", epoch + 1, cfg.epochs, total / len(xt),
                 time.perf_counter() - start)
    model.eval()
    return time.perf_counter() - start
