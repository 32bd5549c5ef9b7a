"""Tensor decoding and validation: every rejection names the field (input.dtype / input.shape / input.data)."""

from __future__ import annotations

import numpy as np
import pytest

from slonn.protos import slonn_pb2 as pb
from slonn.protos.tensors import TensorError, from_tensor, to_tensor

F = 64


def sample(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, F).astype(np.float32)


def tensor(shape, data: bytes | None = None, dtype=pb.FLOAT32) -> pb.Tensor:
    if data is None:
        data = np.zeros(int(np.prod(shape)) if shape else 0, "<f4").tobytes()
    return pb.Tensor(shape=list(shape), dtype=dtype, data=data)


@pytest.mark.parametrize("shape", [[F], [1, F]])
def test_accepts_one_sample_as_f_or_1_by_f(shape):
    x = sample()
    t = pb.Tensor(shape=shape, dtype=pb.FLOAT32, data=x.astype("<f4").tobytes())
    out = from_tensor(t, "input", F)
    assert out.shape == (F,)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x)


def test_to_tensor_roundtrip_is_little_endian():
    x = sample().astype(">f4")  # big-endian in memory: the wire format must still be little-endian
    t = to_tensor(x)
    assert list(t.shape) == [F] and t.dtype == pb.FLOAT32
    assert t.data == x.astype("<f4").tobytes()
    np.testing.assert_array_equal(from_tensor(t, "input", F), x.astype(np.float32))


def test_expected_features_optional():
    assert from_tensor(to_tensor(np.ones(5, np.float32))).shape == (5,)


@pytest.mark.parametrize("dtype", [pb.DATA_TYPE_UNSPECIFIED, 42])
def test_rejects_wrong_dtype(dtype):
    with pytest.raises(TensorError, match=r"^input\.dtype: .*expected FLOAT32"):
        from_tensor(tensor([F], dtype=dtype), "input", F)


@pytest.mark.parametrize("shape", [[F - 1], [F + 1], [2, F], [1, 1, F], [F, 1], [8, 8]])
def test_rejects_wrong_shape(shape):
    with pytest.raises(TensorError, match=r"^input\.shape: ") as info:
        from_tensor(tensor(shape), "input", F)
    assert f"[{F}]" in str(info.value)  # says what was expected


def test_rejects_missing_shape():
    with pytest.raises(TensorError, match=r"^input\.shape: missing"):
        from_tensor(tensor([], data=sample().tobytes()), "input", F)


@pytest.mark.parametrize("shape", [[0], [1, 0], [0, F]])
def test_rejects_empty_tensor(shape):
    with pytest.raises(TensorError, match=r"^input\.shape: .*empty"):
        from_tensor(tensor(shape, data=b""), "input", F)


def test_rejects_negative_dimension():
    with pytest.raises(TensorError, match=r"^input\.shape: .*negative"):
        from_tensor(tensor([-1, F], data=sample().tobytes()), "input", F)


@pytest.mark.parametrize("n_bytes", [0, 4 * F - 1, 4 * F + 4, 8 * F])
def test_rejects_byte_count_mismatch(n_bytes):
    with pytest.raises(TensorError, match=rf"^input\.data: {n_bytes} bytes .*expected {4 * F}"):
        from_tensor(tensor([F], data=b"\0" * n_bytes), "input", F)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rejects_non_finite_values(bad):
    x = sample()
    x[17] = bad
    with pytest.raises(TensorError, match=r"^input\.data: .*NaN or inf"):
        from_tensor(to_tensor(x), "input", F)


def test_message_uses_the_given_field_name():
    with pytest.raises(TensorError, match=r"^features\.shape: "):
        from_tensor(tensor([3]), "features", F)


def test_tensor_error_is_a_value_error():
    assert issubclass(TensorError, ValueError)
