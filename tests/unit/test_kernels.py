"""Every kernel equals the masked reference; the chooser picks the measured table's fastest."""

from __future__ import annotations

import shutil

import pytest
import torch

from slonn.workers import native
from slonn.workers.kernels import EXACT_KERNELS, NATIVE_KERNEL, SparseMLP, select_topk
from slonn.workers.kernels_chooser import SPARSE_MARGIN, KernelChooser, is_dense, measure_kernel_table, promote, split_choice
from slonn.workers.model import MLPArchitecture, SLOAwareMLP

LEVELS = (1.0, 0.5, 0.25, 0.1, 0.05)
CPU = torch.device("cpu")
NATIVE = (NATIVE_KERNEL,) if native.available() else ()
"""The native kernels built here: with a C++ compiler on the machine they must build (tested below)."""


@pytest.fixture(scope="module")
def model() -> SLOAwareMLP:
    torch.manual_seed(0)
    m = SLOAwareMLP(MLPArchitecture(64, (96, 80), 10))
    m.input_mean.copy_(torch.rand(64) * 8)
    m.input_std.copy_(torch.rand(64) * 4 + 0.5)
    return m.eval()


def _inputs(model: SLOAwareMLP, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return model.input_mean + model.input_std * torch.randn(n, 64, generator=gen)


@pytest.mark.parametrize("kernel", EXACT_KERNELS + (NATIVE_KERNEL,))
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("batch", [1, 3, 16, 33])
def test_exact_kernels_equal_reference(model, kernel, level, batch):
    sparse = SparseMLP.from_model(model, CPU)
    if kernel not in sparse.kernels:
        pytest.skip(f"{kernel}: {native.unavailable_reason()}")
    x = _inputs(model, batch, seed=batch)
    with torch.inference_mode():
        torch.testing.assert_close(sparse.forward(x, level, kernel), model(x, level), rtol=1e-4, atol=1e-5)


def test_native_kernels_build_where_a_compiler_is():
    """CI machines have g++: a silent fallback would leave the fused kernels untested and unserved."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine")
    assert native.available(), native.unavailable_reason()


@pytest.mark.parametrize(("kind", "low"), [("gather", "fp16"), ("gather", "bf16"), ("dense", "fp16"),
                                           ("dense", "bf16"), (NATIVE_KERNEL, "bf16")])
@pytest.mark.parametrize("level", LEVELS)
def test_low_precision_kernels_are_close(model, kind, low, level):
    sparse = SparseMLP.from_model(model, CPU, low_precision=low)
    if kind == NATIVE_KERNEL and not NATIVE:
        pytest.skip(f"{kind}: {native.unavailable_reason()}")
    assert f"{kind}_{low}" in sparse.kernels
    x = _inputs(model, 64, seed=7)
    with torch.inference_mode():
        ref = model(x, level)
        out = sparse.forward(x, level, f"{kind}_{low}")
    assert out.dtype == torch.float32
    # Half weights can flip a near-tie in top-k, so compare predictions, and logits loosely.
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    assert (out - ref).abs().median() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("rows", [1, 2, 5, 64])
@pytest.mark.parametrize("k", [1, 7, 50, 99])
def test_select_topk_picks_torch_topk_set(rows, k):
    """The CPU selection (numpy argpartition from two rows) keeps the same units and values as torch.topk."""
    z = torch.randn(rows, 100, generator=torch.Generator().manual_seed(rows * 1000 + k))
    with torch.inference_mode():
        v, idx = select_topk(z, k)
        ref_v, ref_idx = torch.topk(z, k, dim=-1)
    assert idx.shape == (rows, k) and idx.dtype == torch.int64
    torch.testing.assert_close(v, z.gather(1, idx))  # values belong to their indices
    assert [sorted(r) for r in idx.tolist()] == [sorted(r) for r in ref_idx.tolist()]
    torch.testing.assert_close(v.sort(1, descending=True).values, ref_v)


def test_disjoint_units_batch():
    """Samples that keep disjoint units: the union kernel's union is their sum, and every kernel is exact."""
    torch.manual_seed(1)
    m = SLOAwareMLP(MLPArchitecture(4, (64, 32), 5)).eval()
    with torch.no_grad():
        w = torch.full((64, 4), -1.0)
        for i in range(4):  # input i drives units 16*i .. 16*i+15 only
            w[16 * i:16 * (i + 1), i] = 1.0 + torch.rand(16)
        m.hidden[0].weight.copy_(w)
        m.hidden[0].bias.zero_()
    x = torch.eye(4) * 3.0
    sparse = SparseMLP.from_model(m, CPU)
    with torch.inference_mode():
        kept = (m.hidden_activations(x, 0.25)[0] > 0)
        assert kept.sum(1).tolist() == [16] * 4 and kept.any(0).sum() == 64  # disjoint
        for kernel in EXACT_KERNELS + NATIVE:
            torch.testing.assert_close(sparse.forward(x, 0.25, kernel), m(x, 0.25), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not NATIVE, reason="native kernels not built here")
@pytest.mark.parametrize("level", [0.5, 0.25, 0.1])
def test_native_selection_keeps_exactly_k_of_tied_units(level):
    """Every hidden unit ties (identical first-layer rows) and every unit feeds the next layer alike, so
    the logits count how many units were kept: exactly k per layer, as the reference keeps."""
    m = SLOAwareMLP(MLPArchitecture(3, (40, 24), 2)).eval()
    with torch.no_grad():
        m.hidden[0].weight.copy_(torch.tensor([0.5, -0.25, 1.0]).expand(40, 3))
        m.hidden[0].bias.fill_(0.125)
        m.hidden[1].weight.fill_(0.25)
        m.hidden[1].bias.zero_()
        m.head.weight.copy_(torch.tensor([[1.0], [-2.0]]).expand(2, 24))
        m.head.bias.fill_(0.5)
    sparse = SparseMLP.from_model(m, CPU)
    x = torch.tensor([[1.0, 2.0, 3.0], [2.0, 0.0, 1.0]])
    with torch.inference_mode():
        torch.testing.assert_close(sparse.forward(x, level, NATIVE_KERNEL), m(x, level), rtol=1e-5, atol=1e-5)


def test_no_low_precision_layout(model):
    sparse = SparseMLP.from_model(model, CPU, low_precision=None)
    assert set(sparse.kernels) == set(EXACT_KERNELS + NATIVE)  # no half kernel, native or not
    with pytest.raises(ValueError, match="kernel="):
        sparse.forward(_inputs(model, 1, 0), 0.5, "gather_bf16")
    with pytest.raises(ValueError, match="low_precision="):
        SparseMLP.from_model(model, CPU, low_precision="int3")


def test_chooser_picks_fastest_and_nearest_batch_at_or_above():
    chooser = KernelChooser(
        table={},
        timings_ms={1: {0.1: {"dense": 5.0, "gather": 1.0}}, 16: {0.1: {"dense": 9.0, "union": 4.0, "gather": 8.0}}},
        levels=(1.0, 0.1))
    chooser.table = {b: {lv: min(c, key=c.get) for lv, c in row.items()} for b, row in chooser.timings_ms.items()}
    assert chooser.choose(1, 0.1) == "gather"
    assert chooser.choose(2, 0.1) == "union"  # nearest measured size at or above
    assert chooser.choose(500, 0.1) == "union"  # beyond the last: the largest
    again = KernelChooser.from_json(chooser.to_json())
    assert again.table == chooser.table and again.timings_ms == chooser.timings_ms


def test_measured_table_picks_its_fastest(model):
    sparse = SparseMLP.from_model(model, CPU)
    chooser = measure_kernel_table(sparse, LEVELS, batch_sizes=(1, 4), repeats=2)
    for b, row in chooser.timings_ms.items():
        for level, cell in row.items():
            assert set(cell) <= set(sparse.kernels) and "dense" in cell
            choice = chooser.table[b][level]
            fastest = min(cell, key=cell.get)
            # The fastest, unless it is a sparse kernel within the margin of the best dense one: then that.
            best_dense = min((k for k in cell if is_dense(k)), key=cell.get)
            assert choice == fastest or (choice == best_dense
                                         and cell[fastest] > (1 - SPARSE_MARGIN) * cell[best_dense])
            assert chooser.choose(b, level) == choice
    assert KernelChooser.from_json(chooser.to_json()).table == chooser.table


def test_calibration_skips_masked_dense_where_the_plain_model_may_serve(model):
    sparse = SparseMLP.from_model(model, CPU)
    # 1.0 is as accurate as 0.5 and 0.25 (it may serve them) but less accurate than 0.1 (it may not).
    accuracy = {1.0: 0.97, 0.5: 0.97, 0.25: 0.96, 0.1: 0.98}
    chooser = measure_kernel_table(sparse, LEVELS, batch_sizes=(1, 16), repeats=2, accuracy=accuracy)
    for b, row in chooser.timings_ms.items():
        assert "dense" in row[1.0]
        assert not any(is_dense(k) for k in row[0.5]) and not any(is_dense(k) for k in row[0.25])
        assert "dense" in row[0.1]  # its own masked dense is the only dense option it has
        for level in (0.5, 0.25):
            kernel, run_level = split_choice(chooser.choose(b, level), level)
            assert kernel in row[run_level] and (run_level == level or accuracy[run_level] >= accuracy[level])


def test_default_chooser_is_valid():
    chooser = KernelChooser.default(LEVELS)
    assert not chooser.measured
    for b in (1, 4, 64):
        for level in LEVELS:
            assert chooser.choose(b, level) in EXACT_KERNELS


def test_promotion_serves_a_level_with_a_faster_kernel_of_an_at_least_as_accurate_level():
    timings = {64: {1.0: {"dense": 70.0}, 0.5: {"dense": 80.0, "gather": 150.0}, 0.25: {"union": 60.0, "dense": 85.0},
                    0.1: {"gather": 40.0, "dense": 90.0}}}
    chooser = KernelChooser(table={64: {}}, timings_ms=timings, levels=(1.0, 0.5, 0.25, 0.1))
    promote(chooser, {1.0: 0.98, 0.5: 0.98, 0.25: 0.97, 0.1: 0.96})
    assert chooser.choose(64, 0.5) == "dense@1.0"  # dense + mask (80) loses to plain dense (70)
    assert chooser.choose(64, 0.25) == "union"  # its own best is already the fastest
    assert chooser.choose(64, 0.1) == "gather"
    assert chooser.choose(64, 1.0) == "dense"
    assert split_choice("dense@1.0", 0.5) == ("dense", 1.0) and split_choice("gather", 0.1) == ("gather", 0.1)
    # Never to a level less accurate than the one asked for, however fast.
    worse = KernelChooser(table={64: {}}, timings_ms=timings, levels=(1.0, 0.5, 0.25, 0.1))
    promote(worse, {1.0: 0.95, 0.5: 0.98, 0.25: 0.97, 0.1: 0.96})
    assert worse.choose(64, 0.5) == "dense"


def test_masked_dense_never_beats_the_plain_model_it_contains():
    # Masked dense does the plain model's GEMMs plus top-k: a calibration where it measured faster is noise.
    timings = {64: {1.0: {"dense": 70.0, "dense_bf16": 90.0}, 0.5: {"dense": 68.0, "dense_bf16": 89.0}}}
    chooser = KernelChooser(table={64: {}}, timings_ms=timings, levels=(1.0, 0.5))
    promote(chooser, {1.0: 0.98, 0.5: 0.98})
    assert chooser.choose(64, 0.5) == "dense@1.0"
    # Unless 1.0 may not serve the level (less accurate): then the level's own dense runs.
    strict = KernelChooser(table={64: {}}, timings_ms=timings, levels=(1.0, 0.5))
    promote(strict, {1.0: 0.97, 0.5: 0.98})
    assert strict.choose(64, 0.5) == "dense"


def test_a_sparse_kernel_needs_a_clear_win_over_dense():
    timings = {16: {0.5: {"dense": 50.0, "union": 47.0}, 0.1: {"dense": 50.0, "gather": 30.0}}}
    chooser = KernelChooser(table={16: {}}, timings_ms=timings, levels=(0.5, 0.1))
    promote(chooser)
    assert chooser.choose(16, 0.5) == "dense"  # 6% faster is within start-up timing noise
    assert chooser.choose(16, 0.1) == "gather"
    # A half-precision dense GEMM is a dense option too: the sparse kernel must beat it by the margin.
    half = {16: {0.1: {"dense": 50.0, "dense_bf16": 20.0, "gather_bf16": 19.0}}}
    chooser = KernelChooser(table={16: {}}, timings_ms=half, levels=(0.1,))
    promote(chooser)
    assert chooser.choose(16, 0.1) == "dense_bf16"


def test_runner_runs_the_promoted_level(tmp_path, model):
    from slonn.workers.artifact import ModelManifest, save_artifact
    from slonn.workers.runner import ModelRunner

    save_artifact(model, ModelManifest("t", model.arch, LEVELS, {lv: 0.9 for lv in LEVELS}), tmp_path)
    runner = ModelRunner.load(tmp_path, "cpu")
    runner.chooser = KernelChooser(table={1: {lv: "dense@1.0" for lv in LEVELS}}, levels=LEVELS)
    x = _inputs(model, 1, seed=7)
    out = runner.run(x.numpy(), 0.1)
    assert out.kernel == "dense@1.0"
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out.outputs), model(x, 1.0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("precision", "half_kernels"), [
    ("bf16", {"gather_bf16", "dense_bf16"} | {f"{k}_bf16" for k in NATIVE}),
    ("fp16", {"gather_fp16", "dense_fp16"}), ("fp32", set())])
def test_runner_precision_decides_the_kernel_set(tmp_path, model, precision, half_kernels):
    from slonn.workers.artifact import ModelManifest, save_artifact
    from slonn.workers.runner import ModelRunner

    save_artifact(model, ModelManifest("t", model.arch, LEVELS, {lv: 0.9 for lv in LEVELS}), tmp_path)
    runner = ModelRunner.load(tmp_path, "cpu", precision)
    assert set(runner.sparse.kernels) == set(EXACT_KERNELS) | set(NATIVE) | half_kernels
    with pytest.raises(ValueError, match="precision="):
        ModelRunner.load(tmp_path, "cpu", "int8")


def test_profile_file_per_precision():
    from slonn.policy.latency_model import PROFILE_CSV, profile_csv_name

    assert profile_csv_name() == PROFILE_CSV
    assert profile_csv_name("fp32") == "latency_profile-fp32.csv" != profile_csv_name("fp16")
    with pytest.raises(ValueError, match="precision="):
        profile_csv_name("fp8")


def test_a_profile_of_another_precision_is_named():
    from slonn.policy.latency_model import LatencySample, foreign_kernels

    rows = [LatencySample(0.1, 1, 0.0, 1.0, k) for k in ("gather_fp16", "dense@1.0", "dense_bf16@1.0", "union")]
    assert foreign_kernels(rows, "bf16") == {"gather_fp16"}
    assert foreign_kernels(rows, "fp32") == {"gather_fp16", "dense_bf16"}
    assert foreign_kernels(rows, "fp16") == {"dense_bf16"}
