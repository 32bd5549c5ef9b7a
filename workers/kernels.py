"""Kernels that run the hidden layers at a level (PLACEHOLDER: masked dense only).

Issue #3 replaces this with exact sparse kernels (per-sample gather, union
gather-GEMM) and a measured chooser. The interface below is what the runner uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workers.model import SLOAwareMLP, kept_units, topk_mask

KERNELS = ("dense",)


@dataclass
class SparseMLP:
    """Weights of an SLO-aware MLP laid out for the kernels."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    head_w: torch.Tensor
    head_b: torch.Tensor
    input_mean: torch.Tensor
    input_std: torch.Tensor

    @classmethod
    def from_model(cls, model: SLOAwareMLP, device: torch.device) -> "SparseMLP":
        return cls(
            weights=[l.weight.detach().to(device) for l in model.hidden],
            biases=[l.bias.detach().to(device) for l in model.hidden],
            head_w=model.head.weight.detach().to(device), head_b=model.head.bias.detach().to(device),
            input_mean=model.input_mean.to(device), input_std=model.input_std.to(device),
        )

    def forward(self, x: torch.Tensor, keep: float, kernel: str = "dense") -> torch.Tensor:
        h = (x - self.input_mean) / self.input_std
        for w, b in zip(self.weights, self.biases):
            z = torch.addmm(b, h, w.t())
            if keep < 1.0:
                z = topk_mask(z, kept_units(keep, z.shape[-1]))
            h = torch.relu(z)
        return torch.addmm(self.head_b, h, self.head_w.t())


@dataclass
class KernelChooser:
    """Kernel per (batch size, level)."""

    table: dict = field(default_factory=dict)

    @classmethod
    def default(cls, levels) -> "KernelChooser":
        return cls()

    def choose(self, batch_size: int, level: float) -> str:
        return "dense"

    def to_json(self) -> dict:
        return {}


def measure_kernel_table(sparse: SparseMLP, levels, batch_sizes=None, repeats: int = 5) -> KernelChooser:
    return KernelChooser()
