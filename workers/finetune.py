"""SLO-aware fine-tuning: the sandwich rule with distillation from the dense original.

The teacher is the imported model at level 1.0, frozen; its logits on the training split are computed once.
Every mini-batch trains several levels of the shared weights at once, their gradients summed before one
optimiser step (the sandwich rule of slimmable networks): the dense level 1.0, the lowest level, the focus
level (keep 0.1 by default, when it is a candidate) and levels drawn at random from the others between, one
per ``random_levels`` less the focus level. The dense level in every step keeps the top levels where they
were; the lowest level in every step pulls the network towards representations that survive top-k; the
focus level is the one the SLO table leans on. Each level's loss is the KL divergence to the teacher's
outputs at temperature T (scaled by T^2; T = 0.5 sharpens them: on the digits and the embedding head it
raised the low levels more than T = 1 or 2 did, chosen on the selection rows),
mixed with the cross-entropy on the labels when ``distill_weight`` < 1, so the levels learn to reproduce the
original rather than drift from it. Each level's loss is divided by its own detached value (at least
``loss_floor``) before the sum: every level pulls with the same strength, so the lowest level, whose loss is
by far the largest, does not drown the others, and the dense level, whose loss starts at 0, is held at the
original by a steep penalty. Adam with a small learning rate (the weights are trained already; 1e-4, or
1e-3 from 10,000 rows up unless given), cosine-annealed to 0 per step.

The masks need no straight-through estimator: top-k then ReLU is piecewise linear in the pre-activations, so
autograd's gradient (through the kept units, zero through the dropped ones) is the exact gradient of the
level being trained; a unit that should be kept gains gradient at the dense and the higher levels. (A
straight-through variant, the dense gradient through the dropped units, did worse on the digits model.)
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

    epochs: int = 10
    """Passes over the training split (> 0)."""
    batch_size: int = 64
    """Mini-batch size (> 0)."""
    lr: float | None = None
    """Adam learning rate, cosine-annealed to 0 over the run (None: :func:`default_lr` of the rows)."""
    temperature: float = 0.5
    """Distillation temperature (> 0)."""
    distill_weight: float = 1.0
    """Weight of the distillation term; the cross-entropy on the labels gets the rest (in [0, 1])."""
    random_levels: int = 2
    """Levels drawn at random per mini-batch from those between the dense and the lowest (>= 0); each step
    trains the dense level, the lowest level and these; the focus level, when trained, takes one of them."""
    focus_level: float = 0.1
    """A level trained in every step when it is one of the levels (0: none)."""
    loss_floor: float = 0.05
    """Each level's loss is divided by max(its detached value, this) (> 0)."""
    seed: int = 0
    """Seed of the level draws and the batch order."""

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0:
            raise ValueError(f"fine-tune epochs={self.epochs} and batch_size={self.batch_size} must be > 0")
        if (self.lr is not None and not self.lr > 0) or not self.temperature > 0:
            raise ValueError(f"fine-tune lr={self.lr} and temperature={self.temperature} must be > 0")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"fine-tune distill_weight={self.distill_weight} must be in [0, 1]")
        if not self.loss_floor > 0:
            raise ValueError(f"fine-tune loss_floor={self.loss_floor} must be > 0")
        if self.random_levels < 0:
            raise ValueError(f"fine-tune random_levels={self.random_levels} must be >= 0")
        if not 0.0 <= self.focus_level <= 1.0:
            raise ValueError(f"fine-tune focus_level={self.focus_level} must be in [0, 1]")


LARGE_DATA_ROWS = 10_000
"""From this many fine-tuning rows up, :func:`default_lr` is 1e-3; below it, 1e-4."""


def default_lr(rows: int) -> float:
    """The learning rate when none is given: 1e-4 for small data sets, 1e-3 from ``LARGE_DATA_ROWS`` rows up.

    The weights start trained, so the steps are small. On the digits (1,437 rows) 1e-3 overfits the few rows
    and the lowest levels fall; on the embedding head (24,000 rows) 1e-4 leaves them short of where 1e-3 takes
    them (both chosen on the selection rows)."""
    return 1e-3 if rows >= LARGE_DATA_ROWS else 1e-4


def step_levels(levels: tuple[float, ...], random_levels: int, rng: random.Random,
                focus: float = 0.0) -> list[float]:
    """The levels one mini-batch trains: 1.0, the lowest, and ``random_levels`` from those between: ``focus``
    if it is one of them, the rest drawn at random."""
    ordered = sorted({float(lv) for lv in levels} | {1.0}, reverse=True)
    middle = ordered[1:-1]
    fixed = [float(focus)] if random_levels and float(focus) in middle else []
    middle = [lv for lv in middle if lv not in fixed]
    drawn = rng.sample(middle, min(random_levels - len(fixed), len(middle)))
    return ordered[:1] + ordered[-1:][:len(ordered) - 1] + fixed + drawn


def finetune(model: SLOAwareMLP, x: np.ndarray, y: np.ndarray, levels: tuple[float, ...],
             cfg: FinetuneConfig) -> float:
    """Fine-tune ``model`` in place on (x, y) for ``levels``; returns the seconds it took."""
    start = time.perf_counter()
    teacher = logits(model, x, 1.0)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr or default_lr(len(x)))
    steps = cfg.epochs * ((len(xt) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t, w = cfg.temperature, cfg.distill_weight
    for epoch in range(cfg.epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(xt), generator=gen).split(cfg.batch_size):
            target = F.log_softmax(teacher[idx] / t, -1)
            opt.zero_grad(set_to_none=True)
            for keep in step_levels(levels, cfg.random_levels, rng, cfg.focus_level):
                out = model(xt[idx], keep)
                loss = F.kl_div(F.log_softmax(out / t, -1), target, log_target=True, reduction="batchmean") * (t * t)
                if w < 1.0:
                    loss = w * loss + (1.0 - w) * F.cross_entropy(out, yt[idx])
                value = loss.item()
                (loss / max(value, cfg.loss_floor)).backward()
                total += value * len(idx)
            opt.step()
            sched.step()
        log.info("fine-tune epoch %d/%d loss %.4f (%.1fs)", epoch + 1, cfg.epochs, total / len(xt),
                 time.perf_counter() - start)
    model.eval()
    return time.perf_counter() - start
