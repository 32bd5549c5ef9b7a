"""Import: a user's trained MLP plus their data -> a servable slonn artifact.

1. Read the Linear stack (:mod:`workers.layers`) and check it against the data (feature and class counts).
2. Put the preprocessing the model expects into the model (the server applies it; clients send raw features).
3. Calibrate: held-out accuracy per candidate level, as imported.
4. Optionally fine-tune SLO-aware, distilled from the dense original (:mod:`workers.finetune`), on the
   training rows less a selection slice, and measure the levels again. The weights served are the
   fine-tuned ones unless their mean accuracy over the levels on the selection slice is below the imported
   ones' there by more than ``select_tolerance``; the held-out split that the manifest reports takes no part
   in that choice.
5. Write weights, held-out rows and a manifest with both curves, the input contract and the label names.

The levels served are the candidate levels, each with its measured accuracy.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slonn.workers.artifact import ModelManifest, save_artifact
from slonn.workers.calibrate import accuracy_per_level
from slonn.workers.contract import InputContract
from slonn.workers.data import Dataset
from slonn.workers.finetune import FinetuneConfig, default_lr, finetune
from slonn.workers.layers import ArchitectureError, LinearStack, stack_from_sequential
from slonn.workers.model import DEFAULT_LEVELS, SLOAwareMLP

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportConfig:
    """How to import one model."""

    name: str
    """Model name clients put in InferRequest.model."""
    levels: tuple[float, ...] = DEFAULT_LEVELS
    """Candidate keep fractions (each in (0, 1]; 1.0 is added if missing)."""
    preprocessing: str = "none"
    """What the model expects of its inputs (``workers.contract.PREPROCESSING``), computed from the training
    split and applied by the server."""
    finetune: FinetuneConfig | None = field(default_factory=FinetuneConfig)
    """SLO-aware fine-tuning, or None for calibration only."""
    select_fraction: float = 0.1
    """Share of the training rows kept out of fine-tuning to choose between the fine-tuned and the imported
    weights (in (0, 1)); the reported held-out split is not used to choose."""
    select_tolerance: float = 0.01
    """The fine-tuned weights are served unless their mean accuracy over the levels on the selection rows is
    below the imported weights' by more than this (>= 0). The original network was trained on those rows,
    so there it leads at every level by a little: the tolerance absorbs that and a few rows of noise, and
    still catches a fine-tuning that went wrong."""
    seed: int = 0
    """Seed of the fine-tuning (the data split has its own, recorded in the dataset description)."""
    threads: int = 0
    """torch intra-op threads (0 = torch's default)."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must be non-empty")
        if not self.levels or any(not 0 < lv <= 1 for lv in self.levels):
            raise ValueError(f"levels={self.levels}: each level must be in (0, 1]")
        if not 0 < self.select_fraction < 1:
            raise ValueError(f"select_fraction={self.select_fraction} must be in (0, 1)")
        if not self.select_tolerance >= 0:
            raise ValueError(f"select_tolerance={self.select_tolerance} must be >= 0")

    @property
    def all_levels(self) -> tuple[float, ...]:
        return tuple(sorted({float(lv) for lv in self.levels} | {1.0}, reverse=True))


def check_fits(stack: LinearStack, data: Dataset) -> None:
    """The model takes the data's features and has an output per class; else an error naming the layer."""
    first, last = stack.layers[0], stack.layers[-1]
    features = data.x_train.shape[1]
    if first.weight.shape[1] != features:
        raise ArchitectureError(f"first layer {first.name!r} takes {first.weight.shape[1]} features; the data has "
                                f"{features}")
    if last.weight.shape[0] < data.classes:
        raise ArchitectureError(f"last layer {last.name!r} gives {last.weight.shape[0]} outputs; the data has "
                                f"{data.classes} classes")
    if data.labels and last.weight.shape[0] != len(data.labels):
        raise ArchitectureError(f"last layer {last.name!r} gives {last.weight.shape[0]} outputs for "
                                f"{len(data.labels)} label names")


def import_stack(stack: LinearStack, data: Dataset, cfg: ImportConfig) -> tuple[SLOAwareMLP, ModelManifest]:
    """An SLO-aware model from ``stack`` and ``data``; its manifest holds both accuracy curves and the times."""
    check_fits(stack, data)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    contract = InputContract.from_data(data.x_train, cfg.preprocessing, data.feature_names)
    model = stack.to_model()
    mean, std = contract.shift_scale(data.x_train)
    with torch.no_grad():
        model.input_mean.copy_(torch.from_numpy(mean))
        model.input_std.copy_(torch.from_numpy(std))
    levels = cfg.all_levels
    as_is = accuracy_per_level(model, data.x_val, data.y_val, levels)
    calibrate_s = time.perf_counter() - start
    log.info("calibrated in %.1fs: %s", calibrate_s, _fmt(as_is))
    calibration: dict = {"original_accuracy": as_is[1.0], "as_imported": _curve(as_is),
                         "calibrate_seconds": round(calibrate_s, 2)}
    accuracy = as_is
    if cfg.finetune is not None:
        imported = {k: v.clone() for k, v in model.state_dict().items()}
        x_fit, x_sel, y_fit, y_sel = _selection_split(data.x_train, data.y_train, cfg.select_fraction, cfg.seed)
        sel_imported = accuracy_per_level(model, x_sel, y_sel, levels)
        torch.manual_seed(cfg.seed)
        ft_cfg = cfg.finetune if cfg.finetune.lr else replace(cfg.finetune, lr=default_lr(len(x_fit)))
        seconds = finetune(model, x_fit, y_fit, levels, ft_cfg)
        tuned = accuracy_per_level(model, data.x_val, data.y_val, levels)
        sel_tuned = accuracy_per_level(model, x_sel, y_sel, levels)
        log.info("fine-tuned in %.1fs: %s", seconds, _fmt(tuned))
        # Serve the fine-tuned weights unless they lose on the selection slice (mean over the levels).
        loss = float(np.mean(list(sel_imported.values())) - np.mean(list(sel_tuned.values())))
        keep_tuned = loss <= cfg.select_tolerance
        if keep_tuned:
            accuracy = tuned
        else:
            model.load_state_dict(imported)
            log.info("serving the weights as imported: fine-tuning did not raise the mean accuracy on the "
                     "selection rows")
        calibration |= {"finetuned": _curve(tuned), "finetune_seconds": round(seconds, 2),
                        "finetune": asdict(ft_cfg), "served": "finetuned" if keep_tuned else "as_imported",
                        "selection": {"rows": len(y_sel), "tolerance": cfg.select_tolerance,
                                      "as_imported": _curve(sel_imported), "finetuned": _curve(sel_tuned)}}
    import sklearn

    manifest = ModelManifest(
        name=cfg.name, arch=stack.arch, levels=levels, accuracy=accuracy, seed=cfg.seed, dataset=data.describe,
        versions={"torch": torch.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
                  "python": platform.python_version()},
        train_seconds=round(time.perf_counter() - start, 2), input=contract, labels=data.labels,
        calibration=calibration)
    return model, manifest


def import_sequential(model: nn.Sequential, data: Dataset, cfg: ImportConfig,
                      directory: Path | None = None) -> tuple[SLOAwareMLP, ModelManifest]:
    """Import an ``nn.Sequential`` built in Python (Linear layers with ReLU/GELU/SiLU between them); writes the
    artifact to ``directory`` when given."""
    slo_model, manifest = import_stack(stack_from_sequential(model), data, cfg)
    if directory is not None:
        save_artifact(slo_model, manifest, directory, heldout=(data.x_val, data.y_val))
    return slo_model, manifest


def import_to(directory: Path, stack: LinearStack, data: Dataset, cfg: ImportConfig) -> ModelManifest:
    """Import and write the artifact (weights, held-out rows, manifest) to ``directory``."""
    model, manifest = import_stack(stack, data, cfg)
    save_artifact(model, manifest, directory, heldout=(data.x_val, data.y_val))
    log.info("wrote %s in %.1fs", directory, manifest.train_seconds)
    return manifest


def _selection_split(x: np.ndarray, y: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_fit, x_select, y_fit, y_select): a stratified share of the training rows to choose the weights by."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 and len(y) * fraction >= len(counts) else None
    x_fit, x_sel, y_fit, y_sel = train_test_split(x, y, test_size=fraction, random_state=seed, stratify=stratify)
    return x_fit, x_sel, y_fit, y_sel


def _curve(acc: dict[float, float]) -> dict[str, float]:
    return {repr(float(k)): round(float(v), 6) for k, v in acc.items()}


def _fmt(acc: dict[float, float]) -> dict[str, float]:
    return {f"{k:g}": round(v, 4) for k, v in acc.items()}
