"""`slonn import` on files, as a user runs it."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from slonn.scripts.cli import main as slonn
from slonn.workers.artifact import is_artifact, load_manifest


def files(tmp_path, out_features: int = 3):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 32), nn.SiLU(), nn.Linear(32, out_features))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "net.safetensors"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    y = np.array(["low", "mid", "high"])[np.digitize(x[:, 0], [-0.5, 0.5])]
    np.savez(tmp_path / "data.npz", X=x, y=y)
    return tmp_path / "net.safetensors", tmp_path / "data.npz"


def test_import_writes_an_artifact_and_prints_both_curves(tmp_path, capsys):
    weights, data = files(tmp_path)
    out = tmp_path / "model"
    rc = slonn(["import", str(weights), "--data", str(data), "--activation", "silu", "--preprocessing",
                "standardize", "--levels", "1,0.25", "--finetune-epochs", "1", "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["hidden"] == [32] and summary["activation"] == "silu"
    assert summary["labels"] == ["high", "low", "mid"]
    assert set(summary["as_imported"]) == set(summary["finetuned"]) == {"1.0", "0.25"}
    assert is_artifact(out)
    m = load_manifest(out)
    assert m.name == "net" and m.contract.preprocessing == "standardize" and m.dataset["split_seed"] == 0
    # 96 training rows: the small-data learning rate; the recipe's defaults are recorded as used.
    ft = m.calibration["finetune"]
    assert (ft["lr"], ft["temperature"], ft["focus_level"]) == (1e-4, 0.5, 0.1)


def test_the_fine_tuning_recipe_is_set_from_the_command_line(tmp_path, capsys):
    weights, data = files(tmp_path)
    out = tmp_path / "model"
    rc = slonn(["import", str(weights), "--data", str(data), "--levels", "1,0.5,0.25", "--finetune-epochs", "1",
                "--lr", "3e-4", "--temperature", "2", "--focus-level", "0.5", "--activation", "silu",
                "--out", str(out)])
    assert rc == 0
    ft = load_manifest(out).calibration["finetune"]
    assert (ft["lr"], ft["temperature"], ft["focus_level"]) == (3e-4, 2.0, 0.5)
    rc = slonn(["import", str(weights), "--data", str(data), "--temperature", "0", "--activation", "silu",
                "--out", str(out)])
    assert rc == 2 and "temperature=0.0" in capsys.readouterr().err


def test_a_mismatch_is_a_usage_error_naming_the_layer(tmp_path, capsys):
    weights, data = files(tmp_path, out_features=2)
    rc = slonn(["import", str(weights), "--data", str(data), "--out", str(tmp_path / "m")])
    assert rc == 2
    assert "last layer '2' gives 2 outputs; the data has 3 classes" in capsys.readouterr().err
