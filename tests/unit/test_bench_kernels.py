"""bench-kernels' union fraction: the share of a layer's rows an exact kernel must read for a batch."""

from __future__ import annotations

import torch

from slonn.scripts.bench_kernels import _union_fractions
from slonn.workers.model import MLPArchitecture, SLOAwareMLP

ARCH = MLPArchitecture(in_features=16, hidden=(100, 40), out_features=5)


def test_union_fraction_counts_positive_kept_units_of_any_sample_in_the_batch():
    torch.manual_seed(0)
    model = SLOAwareMLP(ARCH).eval()
    x = torch.randn(48, ARCH.in_features)
    with torch.inference_mode():
        one = _union_fractions(model, x, 1, 0.1)
        eight = _union_fractions(model, x, 8, 0.1)
        dense = _union_fractions(model, x, 8, 1.0)
        # one batch of eight, by hand, per layer; a trailing partial batch is left out
        by_hand = [round(float((z > 0).any(0).float().mean()), 3) for z in model.hidden_activations(x[:8], 0.1)]
        eleven = _union_fractions(model, x[:11], 8, 0.1)
    # batch 1: at most ceil(0.1 * width) units per sample
    assert all(0 < f <= 0.1 for f in one)
    # a batch reads the union of its samples' rows: never fewer than one sample's
    assert all(u >= o for u, o in zip(eight, one))
    assert all(d >= u for d, u in zip(dense, eight))
    assert eleven == by_hand
