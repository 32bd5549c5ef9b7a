"""`slonn train`: train an SLO-aware MLP on the digits and write an artifact.

Every mini-batch runs at a level drawn at random from the model's levels, so
all levels stay accurate; the artifact records each level's accuracy on the
held-out split.
"""

from __future__ import annotations

import logging
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slonn.workers.artifact import ModelManifest, save_artifact
from slonn.workers.digits import DigitsSplit, load_split
from slonn.workers.model import (
    DEFAULT_HIDDEN,
    DEFAULT_LEVELS,
    MLPArchitecture,
    SLOAwareMLP,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """How to train one model."""

    name: str = "digits-mlp"
    """Artifact and model name."""
    hidden: tuple[int, ...] = DEFAULT_HIDDEN
    """Hidden layer widths."""
    levels: tuple[float, ...] = DEFAULT_LEVELS
    """Keep fractions to train for (each in (0, 1]; 1.0 is added if missing)."""
    epochs: int = 30
    """Passes over the training split (> 0)."""
    batch_size: int = 64
    """Mini-batch size (> 0)."""
    lr: float = 1e-3
    """Adam learning rate."""
    seed: int = 0
    """Seed for weights, level sampling and the data split."""
    threads: int = 0
    """torch intra-op threads (0 = torch's default)."""

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0:
            raise ValueError(f"epochs={self.epochs} and batch_size={self.batch_size} must be > 0")
        if not self.levels or any(not 0 < lv <= 1 for lv in self.levels):
            raise ValueError(f"levels={self.levels}: each level must be in (0, 1]")


def evaluate(model: SLOAwareMLP, x: np.ndarray, y: np.ndarray, levels: tuple[float, ...]) -> dict[float, float]:
    """Accuracy of ``model`` on (x, y) at each level."""
    model.eval()
    xt = torch.from_numpy(x)
    with torch.inference_mode():
        return {lv: float((model(xt, lv).argmax(-1).numpy() == y).mean()) for lv in levels}


def train(cfg: TrainConfig, split: DigitsSplit | None = None) -> tuple[SLOAwareMLP, ModelManifest]:
    """Train a model per ``cfg``; returns it with a manifest holding held-out accuracy per level."""
    split = split or load_split(seed=cfg.seed)
    levels = tuple(sorted(set(cfg.levels) | {1.0}, reverse=True))
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    arch = MLPArchitecture(split.x_train.shape[1], tuple(cfg.hidden), int(split.y_train.max()) + 1)
    model = SLOAwareMLP(arch)
    x = torch.from_numpy(split.x_train)
    y = torch.from_numpy(split.y_train)
    model.input_mean.copy_(x.mean(0))
    model.input_std.copy_(x.std(0).clamp_min(1.0))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            keep = rng.choice(levels)
            loss = loss_fn(model(x[idx], keep), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        log.info("epoch %d/%d loss %.4f (%.1fs)", epoch + 1, cfg.epochs, total / len(x),
                 time.perf_counter() - start)
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, split.x_test, split.y_test, levels)
    import sklearn

    manifest = ModelManifest(
        name=cfg.name, arch=arch, levels=levels, accuracy=accuracy, seed=cfg.seed,
        dataset=split.describe(),
        versions={"torch": torch.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
                  "python": platform.python_version()},
        train_seconds=round(seconds, 2),
    )
    return model, manifest


def train_to(directory: Path, cfg: TrainConfig) -> ModelManifest:
    """Train and write the artifact to ``directory``."""
    model, manifest = train(cfg)
    save_artifact(model, manifest, directory)
    log.info("wrote %s in %.1fs; held-out accuracy %s", directory, manifest.train_seconds,
             {k: round(v, 4) for k, v in manifest.accuracy.items()})
    return manifest
