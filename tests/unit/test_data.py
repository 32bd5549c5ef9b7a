"""A user's data: files, labels, the held-out split, and the input contract the server applies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slonn.workers.artifact import ModelManifest
from slonn.workers.contract import InputContract, RangeCheck
from slonn.workers.data import encode_labels, load_dataset, make_dataset
from slonn.workers.model import MLPArchitecture, SLOAwareMLP


def rows(n: int = 50, features: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, features)) * [1, 10, 100]).astype(np.float32), np.array(["cat", "dog"] * (n // 2))


def test_string_labels_become_sorted_names_and_indices():
    names, idx = encode_labels(np.array(["dog", "cat", "emu", "cat"]))
    assert names == ("cat", "dog", "emu") and idx.tolist() == [1, 0, 2, 0]


def test_label_names_given_set_the_order_and_unknown_labels_are_named():
    names, idx = encode_labels(np.array(["dog", "cat"]), ("dog", "cat"))
    assert names == ("dog", "cat") and idx.tolist() == [0, 1]
    with pytest.raises(ValueError, match="'emu'"):
        encode_labels(np.array(["emu"]), ("dog", "cat"))


def test_integer_labels_are_the_indices():
    assert encode_labels(np.array([2, 0, 1])) == ((), pytest.approx(np.array([2, 0, 1])))
    with pytest.raises(ValueError, match=">= 0"):
        encode_labels(np.array([-1, 0]))


def test_held_out_split_is_stratified_recorded_and_reproducible():
    x, y = rows(100)
    a, b = make_dataset(x, y, seed=3), make_dataset(x, y, seed=3)
    assert np.array_equal(a.x_val, b.x_val)
    assert not np.array_equal(a.x_val, make_dataset(x, y, seed=4).x_val)
    assert a.describe["split_seed"] == 3 and a.describe["validation"] == "held out"
    assert len(a.y_val) == 20 and a.y_val.sum() == 10  # both classes, half each
    assert a.labels == ("cat", "dog") and a.classes == 2


def test_npz_with_a_validation_split_uses_it(tmp_path):
    x, y = rows(40)
    np.savez(tmp_path / "d.npz", X=x[:30], y=y[:30], X_val=x[30:], y_val=y[30:])
    d = load_dataset(tmp_path / "d.npz")
    assert np.array_equal(d.x_val, x[30:]) and d.describe["validation"] == "given"
    np.savez(tmp_path / "bad.npz", X=x)
    with pytest.raises(ValueError, match="'y' missing"):
        load_dataset(tmp_path / "bad.npz")


def test_csv_with_a_named_label_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,kind,b\n1.5,cat,2\n3,dog,4\n5,cat,6\n7,dog,8\n9,cat,1\n2,dog,3\n4,cat,5\n6,dog,7\n"
                    "8,cat,9\n1,dog,1\n")
    d = load_dataset(path, label="kind", val_fraction=0.2)
    assert d.feature_names == ("a", "b") and d.labels == ("cat", "dog")
    assert sorted(np.concatenate([d.x_train[:, 0], d.x_val[:, 0]]).tolist())[:2] == [1.0, 1.5]
    with pytest.raises(ValueError, match="no label column 'label'"):
        load_dataset(path)
    path.write_text("a,kind\n1,cat\nx,dog\n")
    with pytest.raises(ValueError, match=r"line 3: column 'a' = 'x' is not a number"):
        load_dataset(path, label="kind")


def test_parquet_when_pyarrow_is_installed(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    x, y = rows(20)
    pq.write_table(pa.table({"f0": x[:, 0], "f1": x[:, 1], "f2": x[:, 2], "label": y}), tmp_path / "d.parquet")
    d = load_dataset(tmp_path / "d.parquet")
    assert d.feature_names == ("f0", "f1", "f2") and d.labels == ("cat", "dog")
    assert len(d.x_train) + len(d.x_val) == 20


def test_non_finite_features_are_refused_by_position():
    x, y = rows(10)
    x[4, 2] = np.nan
    with pytest.raises(ValueError, match=r"X\[4, 2\] is nan"):
        make_dataset(x, y)


@pytest.mark.parametrize("preprocessing", ["standardize", "scale", "none"])
def test_preprocessing_round_trip_in_the_model(preprocessing):
    """The server feeds raw features to a model whose buffers apply the contract's preprocessing: the first
    layer then sees exactly what the user's own preprocessing gives."""
    x, _ = rows(64)
    contract = InputContract.from_data(x, preprocessing)
    shift, scale = contract.shift_scale(x)
    if preprocessing == "standardize":
        assert np.allclose((x - shift) / scale, (x - x.mean(0)) / x.std(0), atol=1e-5)
    elif preprocessing == "scale":
        z = (x - shift) / scale
        assert np.allclose(z.min(0), 0) and np.allclose(z.max(0), 1)
    else:
        assert (shift == 0).all() and (scale == 1).all()
    model = SLOAwareMLP(MLPArchitecture(3, (4,), 2))
    with torch.no_grad():
        model.input_mean.copy_(torch.from_numpy(shift))
        model.input_std.copy_(torch.from_numpy(scale))
        first = model.hidden[0]
        xt = torch.from_numpy(x)
        assert torch.equal(first((xt - model.input_mean) / model.input_std),
                           first((xt - torch.from_numpy(shift)) / torch.from_numpy(scale)))


def test_manifest_round_trips_contract_and_labels():
    x, _ = rows(10)
    contract = InputContract.from_data(x, "standardize", ("a", "b", "c"))
    m = ModelManifest("m", MLPArchitecture(3, (8,), 2, "gelu"), (1.0, 0.5), {1.0: 0.9, 0.5: 0.8}, input=contract,
                      labels=("cat", "dog"), calibration={"original_accuracy": 0.9})
    back = ModelManifest.from_json(json.loads(json.dumps(m.to_json())))
    assert back == m and back.contract.names == ("a", "b", "c") and back.arch.activation == "gelu"


def test_far_out_of_range_counts_features_beyond_a_range_width():
    check = RangeCheck(InputContract(3, (0.0, -1.0, 5.0), (10.0, 1.0, 5.0)))
    assert check.far_out(np.array([19.0, 2.9, 5.0], np.float32)) == 0
    assert check.far_out(np.array([21.0, -3.1, 11.0], np.float32)) == 3  # constant 5: margin max(|5|, 1)
    sample = check.sample(100)
    assert sample.min(0).tolist() >= [0.0, -1.0, 5.0] and sample.max(0).tolist() <= [10.0, 1.0, 5.0]
