"""slonn.workers.native: built once per machine into its cache, and absent (not broken) without a compiler."""

from __future__ import annotations

import shutil

import pytest
import torch

from slonn.workers import native
from slonn.workers.kernels import NATIVE_KERNEL, SparseMLP
from slonn.workers.model import MLPArchitecture, SLOAwareMLP


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A cold module: its own cache directory, nothing loaded; restored afterwards."""
    monkeypatch.setenv("SLONN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_reason", None)
    native.library.cache_clear()
    yield tmp_path / "cache"
    native.library.cache_clear()


def _sparse() -> SparseMLP:
    torch.manual_seed(0)
    return SparseMLP.from_model(SLOAwareMLP(MLPArchitecture(8, (32, 16), 3)).eval(), torch.device("cpu"))


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ here")
def test_builds_into_the_cache_once(fresh):
    assert native.library() is not None, native.unavailable_reason()
    built = sorted(fresh.glob("sparse_forward-*.so"))
    assert len(built) == 1 and not list(fresh.glob("*.so.*")) and not list(fresh.glob("tmp*"))
    mtime = built[0].stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library() is not None
    assert sorted(fresh.glob("sparse_forward-*.so")) == built and built[0].stat().st_mtime_ns == mtime


def test_disabled_by_env(fresh, monkeypatch):
    monkeypatch.setenv("SLONN_NATIVE", "0")
    assert native.library() is None and "SLONN_NATIVE=0" in native.unavailable_reason()
    sparse = _sparse()
    assert NATIVE_KERNEL not in sparse.kernels and f"{NATIVE_KERNEL}_bf16" not in sparse.kernels
    with pytest.raises(ValueError, match="kernel="):
        sparse.forward(torch.zeros(1, 8), 0.5, NATIVE_KERNEL)


def test_no_compiler_means_no_native_kernels(fresh, monkeypatch):
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert native.library() is None and "no C++ compiler" in native.unavailable_reason()
    assert NATIVE_KERNEL not in _sparse().kernels


def test_a_compile_error_is_reported_not_raised(fresh, monkeypatch, tmp_path):
    bad = tmp_path / "bad.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    if native._compiler() is None:
        pytest.skip("no C++ compiler here")
    assert native.library() is None
    assert "compiling" in native.unavailable_reason() and not list(fresh.glob("*"))


@pytest.mark.skipif(not native.available(), reason="native kernels not built here")
def test_wrong_input_width_is_refused_before_the_call():
    with pytest.raises(ValueError, match="expected"):
        _sparse().forward(torch.zeros(2, 7), 0.5, NATIVE_KERNEL)


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ here")
@pytest.mark.parametrize("level", [1.0, 0.25, 0.1])
def test_portable_build_equals_the_reference(fresh, monkeypatch, level):
    """Built for the compiler's default target (no -march=native: no AVX-512 path), as on a machine
    whose CPU lacks it, the kernels still equal the reference."""
    monkeypatch.setattr(native, "ARCH_FLAGS", ((),))
    assert native.library() is not None, native.unavailable_reason()
    torch.manual_seed(3)
    model = SLOAwareMLP(MLPArchitecture(8, (48, 40), 3)).eval()
    sparse = SparseMLP.from_model(model, torch.device("cpu"))
    x = torch.randn(5, 8)
    with torch.inference_mode():
        torch.testing.assert_close(sparse.forward(x, level, NATIVE_KERNEL), model(x, level), rtol=1e-4, atol=1e-5)
        ref = model(x, level)
        out = sparse.forward(x, level, f"{NATIVE_KERNEL}_bf16")
    assert (out - ref).abs().median() < 0.05 * ref.abs().max()  # half weights can flip a near-tie in top-k


@pytest.mark.skipif(not native.available(), reason="native kernels not built here")
def test_a_copy_leaves_the_native_plan_behind_and_still_runs():
    import copy
    import pickle

    sparse = _sparse()
    x = torch.randn(3, 8)
    with torch.inference_mode():
        first = sparse.forward(x, 0.5, NATIVE_KERNEL)
        for other in (copy.deepcopy(sparse), pickle.loads(pickle.dumps(sparse))):
            assert not other._native
            torch.testing.assert_close(other.forward(x, 0.5, NATIVE_KERNEL), first)


def test_a_kernel_table_naming_kernels_this_worker_lacks_is_measured_again(tmp_path, monkeypatch):
    from slonn.workers.artifact import ModelManifest, save_artifact
    from slonn.workers.kernels import EXACT_KERNELS
    from slonn.workers.runner import ModelRunner

    torch.manual_seed(0)
    model = SLOAwareMLP(MLPArchitecture(8, (32, 16), 3)).eval()
    save_artifact(model, ModelManifest("t", model.arch, (1.0, 0.5), {1.0: 0.9, 0.5: 0.9}), tmp_path)
    runner = ModelRunner.load(tmp_path, "cpu", "fp32")
    calls = []
    monkeypatch.setattr(runner, "calibrate", lambda *a, **k: calls.append(1))
    runner.use_kernel_table({"table": {"1": {"0.5": "gather"}}, "levels": [1.0, 0.5]})
    assert not calls and runner.chooser.choose(1, 0.5) == "gather"
    runner.use_kernel_table({"table": {"1": {"0.5": "no_such_kernel@1.0"}}, "levels": [1.0, 0.5]})
    assert calls == [1]
    assert "gather" in EXACT_KERNELS
