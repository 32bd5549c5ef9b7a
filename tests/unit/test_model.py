"""SLOAwareMLP reference semantics: level 1.0 is the dense MLP; level k keeps exactly ceil(k*width) units."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slonn.workers.model import MLPArchitecture, SLOAwareMLP, kept_units, topk_mask

ARCH = MLPArchitecture(in_features=16, hidden=(100, 37, 64), out_features=5)
LEVELS = (1.0, 0.5, 0.25, 0.1, 0.05, 0.01)


@pytest.fixture
def model() -> SLOAwareMLP:
    torch.manual_seed(0)
    m = SLOAwareMLP(ARCH).eval()
    with torch.no_grad():
        # Non-trivial standardisation so the test covers it too.
        m.input_mean.copy_(torch.randn(ARCH.in_features))
        m.input_std.copy_(torch.rand(ARCH.in_features) + 0.5)
    return m


def dense_sequential(m: SLOAwareMLP) -> nn.Sequential:
    """The plain MLP from the same weights, with the input standardisation folded into the first Linear."""
    layers: list[nn.Module] = []
    with torch.no_grad():
        for i, lin in enumerate(m.hidden):
            new = nn.Linear(lin.in_features, lin.out_features)
            if i == 0:
                w = lin.weight / m.input_std
                new.weight.copy_(w)
                new.bias.copy_(lin.bias - w @ m.input_mean)
            else:
                new.load_state_dict(lin.state_dict())
            layers += [new, nn.ReLU()]
        head = nn.Linear(m.head.in_features, m.head.out_features)
        head.load_state_dict(m.head.state_dict())
    return nn.Sequential(*layers, head).eval()


def inputs(n: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, ARCH.in_features, generator=torch.Generator().manual_seed(seed)) * 3


def test_level_one_equals_plain_dense_mlp(model):
    x = inputs()
    with torch.inference_mode():
        ours = model(x, keep=1.0)
        plain = dense_sequential(model)(x)
        default = model(x)
    assert ours.shape == (len(x), ARCH.out_features)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(default, ours, rtol=0, atol=0)


def test_lower_level_differs_from_dense(model):
    """Guards the test above: the mask really changes the output at keep < 1."""
    x = inputs()
    with torch.inference_mode():
        assert not torch.allclose(model(x, 0.1), model(x, 1.0), atol=1e-3)


@pytest.mark.parametrize("keep", LEVELS)
def test_each_input_keeps_exactly_ceil_k_width_units(model, keep):
    x = inputs()
    with torch.inference_mode():
        acts = model.hidden_activations(x, keep)
    assert len(acts) == len(ARCH.hidden)
    for width, z in zip(ARCH.hidden, acts):
        k = max(1, math.ceil(Fraction(str(keep)) * width))  # exact decimal arithmetic: 0.1 * 100 is 10
        assert z.shape == (len(x), width)
        if keep < 1.0:
            assert ((z != 0).sum(dim=1) == k).all(), f"width {width}: {(z != 0).sum(dim=1).tolist()} != {k}"
        assert ((torch.relu(z) != 0).sum(dim=1) <= k).all()


@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_kept_units_are_the_top_pre_activations(model, keep):
    """Per input, every kept pre-activation is >= every dropped one of the same layer."""
    x = inputs()
    with torch.inference_mode():
        acts = model.hidden_activations(x, keep)
        h = (x - model.input_mean) / model.input_std
        for layer, masked in zip(model.hidden, acts):
            z = layer(h)
            kept = masked != 0
            torch.testing.assert_close(masked[kept], z[kept])
            lowest_kept = torch.where(kept, z, torch.full_like(z, math.inf)).min(dim=1).values
            highest_dropped = torch.where(kept, torch.full_like(z, -math.inf), z).max(dim=1).values
            assert (lowest_kept >= highest_dropped).all()
            h = torch.relu(masked)


def test_forward_matches_hidden_activations(model):
    """forward() at a level is the head applied to ReLU of the last masked pre-activation."""
    x = inputs()
    with torch.inference_mode():
        last = model.hidden_activations(x, 0.25)[-1]
        torch.testing.assert_close(model(x, 0.25), model.head(torch.relu(last)))


def test_inputs_are_independent_of_the_batch(model):
    """Top-k is per input: a sample's output does not depend on the other samples of its batch."""
    x = inputs()
    with torch.inference_mode():
        batched = model(x, 0.1)
        alone = torch.cat([model(x[i:i + 1], 0.1) for i in range(len(x))])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("keep", "width", "expected"), [
    (1.0, 128, 128),
    (0.5, 128, 64),
    (0.1, 100, 10),        # 0.1 * 100 is 10.000000000000002 in floats: must not round up to 11
    (0.3, 10, 3),          # 0.3 * 10 is 3.0000000000000004
    (0.7, 10, 7),          # 0.7 * 10 is 7.000000000000001
    (0.5, 7, 4),           # ceil(3.5)
    (0.01, 50, 1),         # ceil(0.5)
    (1e-9, 4096, 1),       # at least one unit
    (1.0, 1, 1),
    (0.05, 1, 1),
])
def test_kept_units_values(keep, width, expected):
    assert kept_units(keep, width) == expected


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.0001, 2.0, math.nan, math.inf])
def test_kept_units_rejects_keep_outside_unit_interval(keep):
    with pytest.raises(ValueError, match="keep="):
        kept_units(keep, 128)


@settings(derandomize=True, database=None)
@given(keep=st.floats(min_value=1e-6, max_value=1.0), width=st.integers(min_value=1, max_value=10_000))
def test_kept_units_bounds(keep, width):
    k = kept_units(keep, width)
    assert 1 <= k <= width
    assert k >= keep * width - 1e-6  # keeps at least the fraction asked for
    assert k - 1 < max(keep * width, 1)  # and not one more than needed


@settings(derandomize=True, database=None)
@given(a=st.floats(min_value=1e-6, max_value=1.0), b=st.floats(min_value=1e-6, max_value=1.0),
       width=st.integers(min_value=1, max_value=4096))
def test_kept_units_monotone_in_keep(a, b, width):
    lo, hi = sorted((a, b))
    assert kept_units(lo, width) <= kept_units(hi, width)


def test_topk_mask_keeps_k_largest_per_row():
    z = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-5.0, -4.0, -3.0, -2.0]])
    out = topk_mask(z, 2)
    assert out.tolist() == [[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, -3.0, -2.0]]
    assert topk_mask(z, 4) is z


@pytest.mark.parametrize(("in_f", "hidden", "out_f"), [(0, (4,), 2), (4, (), 2), (4, (4,), 0), (4, (4, 0), 2)])
def test_architecture_validation(in_f, hidden, out_f):
    with pytest.raises(ValueError, match="architecture"):
        MLPArchitecture(in_f, hidden, out_f)
