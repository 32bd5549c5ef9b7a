"""Importing a user's MLP: the architecture from the weights, the levels as imported, the artifact it makes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from slonn.workers.artifact import load_artifact, load_heldout
from slonn.workers.calibrate import accuracy_per_level, logits
from slonn.workers.data import make_dataset
from slonn.workers.finetune import FinetuneConfig
from slonn.workers.importer import ImportConfig, import_sequential, import_stack, import_to
from slonn.workers.layers import (
    ArchitectureError,
    read_state_file,
    stack_from_sequential,
    stack_from_state_dict,
)


def mlp(widths: tuple[int, ...], act=nn.ReLU, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        mods += [nn.Linear(a, b), act()]
    return nn.Sequential(*mods, nn.Linear(widths[-2], widths[-1])).eval()


def toy_data(n: int = 300, features: int = 12, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, features)) * 3 + 5).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 10).astype(np.int64) + (x[:, 2] > 6).astype(np.int64)
    return x, y % classes


# -- architecture from a state dict -------------------------------------------------------------------------


def test_sequential_state_dict_gives_the_architecture_and_weights():
    net = mlp((12, 32, 16, 3))
    stack = stack_from_state_dict(net.state_dict())
    assert (stack.arch.in_features, stack.arch.hidden, stack.arch.out_features) == (12, (32, 16), 3)
    assert [lay.name for lay in stack.layers] == ["0", "2", "4"]
    assert torch.equal(stack.layers[1].weight, net[2].weight)


def test_safetensors_names_sorted_as_text_are_put_back_in_order(tmp_path):
    # 12 layers: a safetensors file lists "10.weight" before "2.weight"; the natural order chains.
    net = mlp((8,) + tuple(range(20, 31)) + (4,))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    stack = stack_from_state_dict(read_state_file(tmp_path / "w.safetensors"))
    assert stack.arch.hidden == tuple(range(20, 31))


def test_named_layers_take_the_order_given_when_names_do_not_sort_into_it():
    state = {"out.weight": torch.zeros(3, 16), "out.bias": torch.zeros(3),
             "fc.weight": torch.zeros(16, 8), "fc.bias": torch.zeros(16)}
    assert stack_from_state_dict(state, order=("fc", "out")).arch.hidden == (16,)
    with pytest.raises(ArchitectureError, match="'nope'"):
        stack_from_state_dict(state, order=("fc", "nope"))


def test_a_layer_whose_inputs_do_not_match_is_named():
    state = {"0.weight": torch.zeros(16, 8), "0.bias": torch.zeros(16),
             "2.weight": torch.zeros(4, 10), "2.bias": torch.zeros(4)}
    with pytest.raises(ArchitectureError, match=r"layer '2' .* takes 10 inputs but layer '0' .* gives 16"):
        stack_from_state_dict(state)


@pytest.mark.parametrize("state, match", [
    ({"0.weight": torch.zeros(16, 8), "0.bias": torch.zeros(5), "1.weight": torch.zeros(2, 16)},
     r"layer '0': bias has shape \[5\]"),
    ({"0.weight": torch.zeros(16, 8), "bn.running_mean": torch.zeros(16), "1.weight": torch.zeros(2, 16)},
     "'bn.running_mean'"),
    ({"0.weight": torch.zeros(16, 8), "norm.weight": torch.zeros(16), "1.weight": torch.zeros(2, 16)},
     "layer 'norm': weight has shape"),
    ({"0.weight": torch.zeros(16, 8), "0.bias": torch.zeros(16)}, "at least two"),
])
def test_what_is_not_a_linear_stack_is_refused_by_name(state, match):
    with pytest.raises(ArchitectureError, match=match):
        stack_from_state_dict(state)


def test_a_missing_bias_is_zero():
    state = {"a.weight": torch.ones(4, 2), "b.weight": torch.ones(1, 4)}
    assert torch.equal(stack_from_state_dict(state).layers[0].bias, torch.zeros(4))


def test_pt_files_load_without_unpickling_objects(tmp_path):
    net = mlp((6, 8, 2))
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    assert stack_from_state_dict(read_state_file(tmp_path / "sd.pt")).arch.hidden == (8,)
    torch.save(net, tmp_path / "model.pt")  # the whole module: needs an unrestricted unpickle, refused
    with pytest.raises(ValueError, match="weights_only"):
        read_state_file(tmp_path / "model.pt")


# -- nn.Sequential --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act, name", [(nn.ReLU, "relu"), (nn.GELU, "gelu"), (nn.SiLU, "silu"),
                                       (lambda: nn.GELU(approximate="tanh"), "gelu_tanh")])
def test_sequential_activation_is_read_from_its_modules(act, name):
    assert stack_from_sequential(mlp((5, 7, 7, 2), act)).activation == name


@pytest.mark.parametrize("net, match", [
    (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.Softmax(-1)), r"module '3' \(Softmax\)"),
    (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2)), "mixes"),
    (nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)), r"module '1' \(BatchNorm1d\)"),
    (nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), "no activation"),
])
def test_sequential_that_is_not_a_plain_mlp_is_refused_by_module(net, match):
    with pytest.raises(ArchitectureError, match=match):
        stack_from_sequential(net)


# -- calibration ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU, nn.SiLU])
@pytest.mark.parametrize("preprocessing", ["none", "standardize", "scale"])
def test_level_one_is_the_original_model_bit_for_bit(act, preprocessing):
    x, y = toy_data()
    data = make_dataset(x, y, seed=1)
    net = mlp((12, 40, 24, 3), act)
    model, manifest = import_stack(stack_from_sequential(net), data,
                                   ImportConfig("toy", levels=(1.0, 0.5), preprocessing=preprocessing, finetune=None))
    shift, scale = manifest.contract.shift_scale(data.x_train)
    with torch.inference_mode():
        original = net((torch.from_numpy(data.x_val) - torch.from_numpy(shift)) / torch.from_numpy(scale))
    assert torch.equal(logits(model, data.x_val, 1.0), original)
    acc = float((original.argmax(-1).numpy() == data.y_val).mean())
    assert manifest.calibration["original_accuracy"] == acc == manifest.accuracy[1.0]


def test_calibration_alone_serves_the_levels_as_measured(tmp_path):
    x, y = toy_data()
    data = make_dataset(x, y, seed=1)
    manifest = import_to(tmp_path / "a", stack_from_sequential(mlp((12, 64, 3))), data,
                         ImportConfig("toy", levels=(0.5, 0.1), finetune=None))
    assert manifest.levels == (1.0, 0.5, 0.1)
    model, loaded = load_artifact(tmp_path / "a")
    assert loaded.accuracy == accuracy_per_level(model, data.x_val, data.y_val, loaded.levels)
    assert "finetuned" not in loaded.calibration
    x_held, y_held = load_heldout(tmp_path / "a")
    assert np.array_equal(x_held, data.x_val) and np.array_equal(y_held, data.y_val)


def test_finetuning_records_both_curves_and_serves_the_better():
    x, y = toy_data(n=400)
    data = make_dataset(x, y, seed=2)
    net = mlp((12, 48, 48, 3))
    before = net[0].weight.detach().clone()
    model, manifest = import_sequential(net, data, ImportConfig(
        "toy", levels=(1.0, 0.25), preprocessing="standardize", finetune=FinetuneConfig(epochs=2, batch_size=32)))
    cal = manifest.calibration
    assert set(cal["as_imported"]) == set(cal["finetuned"]) == {"1.0", "0.25"}
    served = cal[cal["served"]]
    # Chosen on a slice of the training rows, not on the reported held-out split.
    sel = cal["selection"]
    assert sel["rows"] == 32 and set(sel["as_imported"]) == set(sel["finetuned"]) == {"1.0", "0.25"}
    mean = {k: np.mean(list(sel[k].values())) for k in ("as_imported", "finetuned")}
    tuned_wins = mean["finetuned"] >= mean["as_imported"] - sel["tolerance"]
    assert cal["served"] == ("finetuned" if tuned_wins else "as_imported")
    assert manifest.accuracy == {float(k): pytest.approx(v, abs=1e-6) for k, v in served.items()}
    assert manifest.accuracy == accuracy_per_level(model, data.x_val, data.y_val, manifest.levels)
    assert cal["finetune"]["epochs"] == 2
    assert torch.equal(net[0].weight, before)  # the user's network is left as it was


def test_finetuning_that_lowers_held_out_accuracy_is_not_served():
    x, y = toy_data(n=400)
    data = make_dataset(x, y, seed=2)
    net = mlp((12, 48, 48, 3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xs, ys = torch.from_numpy((data.x_train - data.x_train.mean(0)) / data.x_train.std(0)), torch.from_numpy(data.y_train)
    for _ in range(200):  # a network that fits the data well
        opt.zero_grad()
        nn.functional.cross_entropy(net(xs), ys).backward()
        opt.step()
    # A learning rate of 50 wrecks it: the import serves the weights as imported.
    model, manifest = import_sequential(net.eval(), data, ImportConfig(
        "toy", levels=(1.0, 0.25), preprocessing="standardize", finetune=FinetuneConfig(epochs=1, batch_size=32,
                                                                                         lr=50.0)))
    cal = manifest.calibration
    assert cal["served"] == "as_imported" and cal["as_imported"]["1.0"] > 0.8
    assert manifest.accuracy == {float(k): pytest.approx(v, abs=1e-6) for k, v in cal["as_imported"].items()}
    assert torch.equal(model.hidden[0].weight, net[0].weight)


def test_a_model_that_does_not_fit_the_data_is_refused_naming_the_layer():
    x, y = toy_data()
    with pytest.raises(ArchitectureError, match="first layer '0' takes 10 features; the data has 12"):
        import_stack(stack_from_sequential(mlp((10, 16, 3))), make_dataset(x, y), ImportConfig("toy", finetune=None))
    with pytest.raises(ArchitectureError, match="last layer '2' gives 2 outputs; the data has 3 classes"):
        import_stack(stack_from_sequential(mlp((12, 16, 2))), make_dataset(x, y), ImportConfig("toy", finetune=None))
