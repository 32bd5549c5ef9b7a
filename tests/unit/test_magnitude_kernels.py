"""GELU and SiLU models: each input keeps its units of largest activation magnitude, in every exact kernel."""

from __future__ import annotations

import pytest
import torch

from slonn.workers.kernels import EXACT_KERNELS, SparseMLP
from slonn.workers.model import MLPArchitecture, SLOAwareMLP, kept_units, topk_magnitude_mask

LEVELS = (1.0, 0.5, 0.1, 0.02)
CPU = torch.device("cpu")


def make(activation: str) -> SLOAwareMLP:
    torch.manual_seed(0)
    m = SLOAwareMLP(MLPArchitecture(24, (96, 64), 7, activation))
    m.input_mean.copy_(torch.rand(24) * 3)
    m.input_std.copy_(torch.rand(24) + 0.5)
    return m.eval()


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
def test_only_the_exact_kernels_are_offered(activation):
    """The fused and half kernels assume ReLU (top-k of the pre-activation, positive units only)."""
    assert SparseMLP.from_model(make(activation), CPU).kernels == EXACT_KERNELS


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("kernel", EXACT_KERNELS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("batch", [1, 5, 32])
def test_kernels_equal_the_reference(activation, kernel, level, batch):
    model = make(activation)
    sparse = SparseMLP.from_model(model, CPU)
    x = model.input_mean + model.input_std * torch.randn(batch, 24, generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        torch.testing.assert_close(sparse.forward(x, level, kernel), model(x, level), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_reference_keeps_the_largest_magnitudes_of_either_sign(activation):
    model = make(activation)
    x = torch.randn(9, 24)
    with torch.inference_mode():
        acts = model.hidden_activations(x, 0.1)
        dense = model.hidden_activations(x, 1.0)
    k = kept_units(0.1, 96)
    assert ((acts[0] != 0).sum(1) == k).all()
    kept = acts[0] != 0
    # Every kept unit's magnitude is at least every dropped one's (same input to the first layer).
    assert (dense[0].abs()[kept].reshape(9, k).min(1).values
            >= dense[0].abs().masked_fill(kept, 0).max(1).values).all()


def test_magnitude_mask_keeps_negative_values():
    a = torch.tensor([[-5.0, 1.0, 2.0, -0.5], [3.0, -2.0, -4.0, 1.0]])
    assert topk_magnitude_mask(a, 2).tolist() == [[-5.0, 0.0, 2.0, 0.0], [3.0, 0.0, -4.0, 0.0]]
