"""Run batches of one model at a level on one device.

``ModelRunner.run`` is what a worker process calls per batch. It picks the
kernel for (batch size, level) from a :class:`~workers.kernels_chooser.KernelChooser`
and times the call device-synchronised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slonn.precision import DEFAULT_PRECISION, low_precision_of
from slonn.workers.artifact import ModelManifest, load_artifact
from slonn.workers.device import DeviceTimer, pick_device
from slonn.workers.kernels_chooser import KernelChooser, measure_kernel_table, split_choice
from slonn.workers.model import SLOAwareMLP

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOutput:
    outputs: np.ndarray
    """batch x out_features logits, float32."""
    exec_ms: float
    """Wall time of the model call, device-synchronised."""
    kernel: str
    """Kernel that ran the hidden layers ("kernel@level" when a more accurate level ran, being faster)."""


class ModelRunner:
    """One loaded model on one device, ready to run batches at any of its levels."""

    def __init__(self, model: SLOAwareMLP, manifest: ModelManifest, device: torch.device,
                 precision: str = DEFAULT_PRECISION) -> None:
        from slonn.workers.kernels import SparseMLP

        self.manifest = manifest
        self.device = device
        self.model = model.to(device).eval()
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            log.warning("%s has no native bf16: its bf16 kernels will be slow (the measured kernel table should "
                        "not pick them); --precision fp16 or fp32 may suit it better", device)
        self.sparse = SparseMLP.from_model(self.model, device, low_precision=low_precision_of(precision))
        self.chooser = KernelChooser.default(manifest.levels)

    @classmethod
    def load(cls, directory: Path, device: str = "auto", precision: str = DEFAULT_PRECISION) -> "ModelRunner":
        dev = pick_device(device)
        model, manifest = load_artifact(directory, dev)
        return cls(model, manifest, dev, precision)

    def calibrate(self, batch_sizes: tuple[int, ...] | None = None, repeats: int = 5) -> dict:
        """Measure every kernel on this machine and make the chooser pick the fastest; returns the table."""
        self.chooser = measure_kernel_table(self.sparse, self.manifest.levels, batch_sizes=batch_sizes,
                                            repeats=repeats, accuracy=self.manifest.accuracy)
        return self.chooser.to_json()

    def use_kernel_table(self, table: dict) -> None:
        """Use a table measured earlier on this machine (e.g. by the worker this one replaces); if it names a
        kernel this worker cannot run (the native library did not load here), measure a table instead."""
        chooser = KernelChooser.from_json(table)
        missing = {split_choice(k, 1.0)[0] for row in chooser.table.values() for k in row.values()}
        missing -= set(self.sparse.kernels)
        if missing:
            log.warning("kernel table names %s, which this worker cannot run; calibrating instead", sorted(missing))
            self.calibrate()
            return
        self.chooser = chooser

    def run(self, inputs: np.ndarray, level: float) -> RunOutput:
        if level not in self.manifest.levels:
            raise ValueError(f"level={level} is not one of model {self.manifest.name!r}'s levels {self.manifest.levels}")
        choice = self.chooser.choose(len(inputs), level)
        kernel, run_level = split_choice(choice, level)
        x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        with torch.inference_mode():
            x = x.to(self.device)
            with DeviceTimer(self.device) as timer:
                y = self.sparse.forward(x, run_level, kernel)
            out = y.float().cpu().numpy()
        return RunOutput(out, timer.ms, choice)
