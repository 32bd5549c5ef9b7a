"""The Open Inference Protocol's protocol-neutral part: tensors in (every datatype), parameters, metadata."""

from __future__ import annotations

import numpy as np
import pytest

from slonn.scheduler import oip
from slonn.scheduler.errors import InvalidArgument, NotFound
from slonn.workers.artifact import ModelManifest
from slonn.workers.model import MLPArchitecture

MANIFEST = ModelManifest(name="m", arch=MLPArchitecture(in_features=4, hidden=(8,), out_features=3),
                         levels=(1.0, 0.5), accuracy={1.0: 0.9, 0.5: 0.8})
X = np.arange(8, dtype=np.float32).reshape(2, 4)


def decode(datatype, shape, raw=None, values=None, max_samples=16):
    return oip.decode_samples(MANIFEST, "inputs[0]", datatype, shape, raw, values, max_samples)


@pytest.mark.parametrize("datatype,wire", [("FP32", "<f4"), ("FP16", "<f2"), ("FP64", "<f8"), ("INT8", "i1"),
                                           ("INT32", "<i4"), ("INT64", "<i8"), ("UINT16", "<u2"),
                                           ("UINT64", "<u8")])
def test_raw_and_typed_contents_convert_exactly(datatype, wire):
    raw = X.astype(wire).tobytes()
    np.testing.assert_array_equal(decode(datatype, [2, 4], raw=raw), X)
    np.testing.assert_array_equal(decode(datatype, [2, 4], values=X.astype(wire).reshape(-1).tolist()), X)


def test_bf16_is_the_top_half_of_fp32():
    raw = (X.view(np.uint32) >> 16).astype("<u2").tobytes()  # these values are exact in bfloat16
    np.testing.assert_array_equal(decode("BF16", [2, 4], raw=raw), X)


def test_nested_json_data_is_flattened_in_c_order():
    np.testing.assert_array_equal(decode("FP32", [2, 4], values=X.tolist()), X)


@pytest.mark.parametrize("kwargs,words", [
    ({"datatype": "BYTES", "shape": [2, 4], "values": []}, "inputs[0].datatype"),
    ({"datatype": "BOOL", "shape": [2, 4], "values": []}, "inputs[0].datatype"),
    ({"datatype": "FP32", "shape": [4], "values": [0] * 4}, "inputs[0].shape"),
    ({"datatype": "FP32", "shape": [2, 5], "values": [0] * 10}, "inputs[0].shape"),
    ({"datatype": "FP32", "shape": [0, 4], "values": []}, "inputs[0].shape"),
    ({"datatype": "FP32", "shape": [17, 4], "values": [0] * 68}, "17 samples, at most 16 per request"),
    ({"datatype": "FP32", "shape": [2, 4], "raw": b"\0" * 31}, "31 bytes"),
    ({"datatype": "FP32", "shape": [2, 4], "values": [0] * 7}, "7 values"),
    ({"datatype": "FP32", "shape": [2, 4], "values": ["a"] * 8}, "inputs[0].data"),
    ({"datatype": "FP32", "shape": [2, 4], "values": [np.nan] * 8}, "NaN"),
    ({"datatype": "FP64", "shape": [2, 4], "values": [1e300] * 8}, "range"),
    ({"datatype": "INT64", "shape": [2, 4], "values": [2**25] * 8}, "2^24"),
    ({"datatype": "UINT64", "shape": [2, 4], "raw": np.full(8, 2**40, "<u8").tobytes()}, "2^24"),
])
def test_bad_tensors_are_invalid_argument_naming_the_field(kwargs, words):
    with pytest.raises(InvalidArgument, match=words.replace("^", r"\^").replace("[", r"\[").replace("]", r"\]")):
        decode(**kwargs)


def test_more_samples_than_the_limit_names_the_setting_it_comes_from():
    with pytest.raises(InvalidArgument, match=r"^inputs\[0\]\.shape: got \[9, 4\], 9 samples, at most 8 per "
                                              r"request \(max_inflight=8\)"):
        oip.decode_samples(MANIFEST, "inputs[0]", "FP32", [9, 4], None, [0] * 36, 8, "max_inflight")


def test_parameters_default_class_and_types():
    assert oip.read_parameters({}, "std") == ("std", 0.0)
    assert oip.read_parameters({"slo_class": "fast", "latency_budget_ms": 20}, "std") == ("fast", 20.0)
    for bad in ({"slo_class": 1}, {"latency_budget_ms": "10"}, {"latency_budget_ms": True}):
        with pytest.raises(InvalidArgument, match="parameters."):
            oip.read_parameters(bad, "std")


def test_metadata_and_unknown_models():
    meta = oip.model_metadata(MANIFEST)
    assert meta["inputs"][0]["shape"] == [-1, 4] and meta["outputs"][0]["shape"] == [-1, 3]
    assert oip.find_model({"m": MANIFEST}, "m", "1") is MANIFEST
    with pytest.raises(NotFound, match="served models: \\['m'\\]"):
        oip.find_model({"m": MANIFEST}, "x")
    with pytest.raises(NotFound, match="version '2'"):
        oip.find_model({"m": MANIFEST}, "m", "2")
