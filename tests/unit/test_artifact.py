"""Artifacts: safetensors weights + JSON manifest round-trip; clear errors for incomplete directories."""

from __future__ import annotations

import json

import pytest
import torch

import numpy as np

from slonn.workers.artifact import (MANIFEST_FILE, WEIGHTS_FILE, ModelManifest, is_artifact, load_artifact,
                                   load_labelled_rows, load_manifest, save_artifact)
from slonn.workers.model import MLPArchitecture, SLOAwareMLP

ARCH = MLPArchitecture(in_features=8, hidden=(32, 16), out_features=3)
LEVELS = (1.0, 0.5, 0.25, 0.1)


def make_model() -> tuple[SLOAwareMLP, ModelManifest]:
    torch.manual_seed(3)
    model = SLOAwareMLP(ARCH)
    with torch.no_grad():
        model.input_mean.copy_(torch.arange(8.0))
        model.input_std.copy_(torch.linspace(1.0, 2.0, 8))
    manifest = ModelManifest(name="unit", arch=ARCH, levels=LEVELS,
                             accuracy={1.0: 0.97, 0.5: 0.96, 0.25: 0.93, 0.1: 0.9}, seed=7,
                             dataset={"name": "synthetic"}, versions={"torch": torch.__version__},
                             train_seconds=1.5)
    return model, manifest


def test_roundtrip_preserves_weights_buffers_and_manifest(tmp_path):
    model, manifest = make_model()
    assert save_artifact(model, manifest, tmp_path / "m") == tmp_path / "m"
    assert is_artifact(tmp_path / "m")
    loaded, loaded_manifest = load_artifact(tmp_path / "m")
    assert loaded_manifest == manifest
    assert not loaded.training
    original = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, original[name]), name
    assert set(loaded.state_dict()) == set(original)  # input_mean / input_std buffers included
    x = torch.randn(5, ARCH.in_features)
    with torch.inference_mode():
        for level in LEVELS:
            assert torch.equal(loaded(x, level), model.eval()(x, level))


def test_files_on_disk_are_safetensors_and_json(tmp_path):
    model, manifest = make_model()
    save_artifact(model, manifest, tmp_path)
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / WEIGHTS_FILE))) == set(model.state_dict())
    data = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert data["format_version"] == 1
    assert data["levels"] == list(LEVELS)
    assert data["arch"]["hidden"] == [32, 16]
    # JSON keys are strings; they come back as the same floats.
    assert {float(k) for k in data["accuracy"]} == set(LEVELS)


def test_load_without_manifest_names_the_missing_file(tmp_path):
    model, manifest = make_model()
    save_artifact(model, manifest, tmp_path)
    (tmp_path / MANIFEST_FILE).unlink()
    assert not is_artifact(tmp_path)
    with pytest.raises(FileNotFoundError, match=MANIFEST_FILE):
        load_artifact(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model artifact"):
        load_manifest(tmp_path / "does-not-exist")


def test_empty_directory_is_not_an_artifact(tmp_path):
    assert not is_artifact(tmp_path)
    with pytest.raises(FileNotFoundError, match=MANIFEST_FILE):
        load_artifact(tmp_path)


def test_unknown_format_version_is_rejected(tmp_path):
    model, manifest = make_model()
    save_artifact(model, manifest, tmp_path)
    data = json.loads((tmp_path / MANIFEST_FILE).read_text())
    data["format_version"] = 99
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format_version"):
        load_manifest(tmp_path)


def test_manifest_json_roundtrip_is_exact():
    _, manifest = make_model()
    assert ModelManifest.from_json(json.loads(json.dumps(manifest.to_json()))) == manifest


def test_numpy_levels_and_accuracies_roundtrip(tmp_path):
    """Levels from numpy (np.linspace, an array) must write a manifest that loads back."""
    import numpy as np

    model, manifest = make_model()
    levels = tuple(np.array(LEVELS, dtype=np.float64))
    manifest = ModelManifest(name="np", arch=ARCH, levels=levels,
                             accuracy={lv: np.float32(0.9) for lv in np.array(LEVELS, dtype=np.float64)})
    save_artifact(model, manifest, tmp_path)
    loaded = load_manifest(tmp_path)
    assert loaded.levels == LEVELS
    assert loaded.accuracy == {lv: pytest.approx(0.9) for lv in LEVELS}


def test_labelled_rows_come_from_an_artifacts_held_out_rows_or_a_data_file(tmp_path):
    model, manifest = make_model()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 8)).astype(np.float32), rng.integers(0, 3, 30)
    save_artifact(model, manifest, tmp_path / "art", heldout=(x, y))
    rx, ry = load_labelled_rows(tmp_path / "art")
    np.testing.assert_array_equal(rx, x)
    np.testing.assert_array_equal(ry, y)
    np.savez(tmp_path / "d.npz", X=x[:20], y=y[:20], X_val=x[20:], y_val=y[20:])
    dx, dy = load_labelled_rows(tmp_path / "d.npz")
    np.testing.assert_array_equal(dx, x[20:])
    np.testing.assert_array_equal(dy, y[20:])


def test_labelled_rows_from_a_directory_that_is_no_artifact_name_the_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match=MANIFEST_FILE):
        load_labelled_rows(tmp_path)


def test_the_simulators_accuracy_draw_scores_any_models_own_held_out_rows(tmp_path):
    from slonn.scheduler.simulator import held_out_correct

    model, manifest = make_model()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    with torch.inference_mode():
        dense = model(torch.from_numpy(x)).argmax(1).numpy()
    y = dense.copy()
    y[:10] = (y[:10] + 1) % 3  # ten rows the dense model gets wrong
    save_artifact(model, manifest, tmp_path / "art", heldout=(x, y))
    correct = held_out_correct(tmp_path / "art")
    assert correct.shape == (len(LEVELS), 50)
    assert correct[0].tolist() == [False] * 10 + [True] * 40  # row 0: the highest level, the dense model
