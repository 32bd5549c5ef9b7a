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


def test_bench_kernels_takes_an_imported_gelu_artifact(tmp_path):
    """Any artifact: its own held-out rows are the inputs and the accuracy set; GELU runs the exact kernels."""
    import numpy as np
    from torch import nn

    from slonn.scripts import bench_kernels
    from slonn.workers.data import make_dataset
    from slonn.workers.importer import ImportConfig, import_sequential

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 40), nn.GELU(), nn.Linear(40, 2))
    import_sequential(net, make_dataset(x, y), ImportConfig("gelu-toy", levels=(1.0, 0.25), finetune=None),
                      tmp_path / "a")
    threads = torch.get_num_threads()
    try:
        result = bench_kernels.run(bench_kernels._parse(["--model-dir", str(tmp_path / "a"), "--batch-sizes", "1,4",
                                                         "--repeats", "1"]))
    finally:
        torch.set_num_threads(threads)
    assert result["model"]["activation"] == "gelu" and result["inputs"]["held_out"] == 40
    assert {(r["batch"], r["level"]) for r in result["rows"]} == {(1, 1.0), (1, 0.25), (4, 1.0), (4, 0.25)}
    assert all({k.split("@")[0] for k in r["kernels_ms"]} <= {"dense", "gather", "union"} for r in result["rows"])
    for row in result["accuracy"].values():  # every exact kernel answers as the reference
        assert {k: v for k, v in row.items()} == {k: row["reference"] for k in row}
