"""The SLO-aware MLP: one set of weights, several sparsity levels.

At level ``keep`` every hidden layer keeps, for each input separately, exactly
its top ``kept_units(keep, width)`` pre-activations, zeroes the rest, then
applies ReLU. Level 1.0 is the plain dense MLP. With a GELU or SiLU
activation (imported models), the activation runs first and each input keeps
the ``kept_units`` outputs of largest magnitude: those functions are not zero
below 0, so the units that matter are the large ones of either sign.

This module is the *reference* semantics (a dense matmul and a mask) used for
training and as the oracle the fast kernels in ``workers/kernels.py`` are
tested against. Serving runs the kernels, not this forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_LEVELS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1, 0.05, 0.02, 0.01)
DEFAULT_HIDDEN: tuple[int, ...] = (4096, 4096, 4096)
ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "gelu_tanh", "silu")
"""Hidden activations: ReLU (top-k on the pre-activation), GELU (exact erf or tanh approximation) and SiLU
(top-k on the output's magnitude)."""


def kept_units(keep: float, width: int) -> int:
    """Units a hidden layer of ``width`` keeps per input at level ``keep``: ceil(keep*width), at least 1.

    The epsilon stops float noise from rounding up (0.1 * 100 is 10.000000000000002).
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep} must be in (0, 1]")
    return max(1, min(width, math.ceil(keep * width - 1e-9)))


def topk_mask(z: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's k largest entries of ``z``, zero the rest (ties broken by torch.topk)."""
    if k >= z.shape[-1]:
        return z
    values, idx = torch.topk(z, k, dim=-1, sorted=False)
    return torch.zeros_like(z).scatter_(-1, idx, values)


@dataclass(frozen=True)
class MLPArchitecture:
    """Shape of an SLO-aware MLP."""

    in_features: int
    """Input features per sample (64 for 8x8 digits)."""
    hidden: tuple[int, ...]
    """Width of each hidden layer."""
    out_features: int
    """Output logits per sample."""
    activation: str = "relu"
    """Hidden activation, one of ACTIVATIONS."""

    def __post_init__(self) -> None:
        if self.in_features <= 0 or self.out_features <= 0 or not self.hidden:
            raise ValueError(f"architecture {self}: in/out features must be > 0 and hidden non-empty")
        if any(w <= 0 for w in self.hidden):
            raise ValueError(f"architecture {self}: every hidden width must be > 0")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"architecture activation={self.activation!r} must be one of {ACTIVATIONS}")


def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    """``activation`` (one of ACTIVATIONS) applied to ``z``."""
    if activation == "relu":
        return torch.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return F.silu(z)


def topk_magnitude_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's k entries of largest magnitude, zero the rest."""
    if k >= a.shape[-1]:
        return a
    idx = torch.topk(a.abs(), k, dim=-1, sorted=False).indices
    return torch.zeros_like(a).scatter_(-1, idx, a.gather(-1, idx))


def sparse_activation(z: torch.Tensor, keep: float, activation: str) -> torch.Tensor:
    """A hidden layer's output at level ``keep`` from its pre-activations ``z`` (the reference semantics)."""
    if activation == "relu":
        if keep < 1.0:
            z = topk_mask(z, kept_units(keep, z.shape[-1]))
        return torch.relu(z)
    a = activate(z, activation)
    return a if keep >= 1.0 else topk_magnitude_mask(a, kept_units(keep, a.shape[-1]))


class SLOAwareMLP(nn.Module):
    """Hidden layers Linear+activation with per-input top-k at a chosen level, then a Linear head.

    Inputs are standardised inside the model (``input_mean``/``input_std``
    buffers, fitted on the training split), so clients send raw features.
    """

    def __init__(self, arch: MLPArchitecture) -> None:
        super().__init__()
        self.arch = arch
        widths = (arch.in_features, *arch.hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(arch.hidden[-1], arch.out_features)
        self.register_buffer("input_mean", torch.zeros(arch.in_features))
        self.register_buffer("input_std", torch.ones(arch.in_features))

    def forward(self, x: torch.Tensor, keep: float = 1.0) -> torch.Tensor:
        h = (x - self.input_mean) / self.input_std
        for layer in self.hidden:
            h = sparse_activation(layer(h), keep, self.arch.activation)
        return self.head(h)

    def hidden_activations(self, x: torch.Tensor, keep: float) -> list[torch.Tensor]:
        """Masked pre-activations of every hidden layer (ReLU), or masked activations (GELU, SiLU), for tests
        and analysis: a unit is used where the entry is > 0 (ReLU) or != 0 (the others)."""
        out = []
        h = (x - self.input_mean) / self.input_std
        for layer in self.hidden:
            z = layer(h)
            if self.arch.activation != "relu":
                h = sparse_activation(z, keep, self.arch.activation)
                out.append(h)
                continue
            if keep < 1.0:
                z = topk_mask(z, kept_units(keep, z.shape[-1]))
            out.append(z)
            h = torch.relu(z)
        return out
