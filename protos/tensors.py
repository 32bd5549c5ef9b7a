"""Tensor <-> numpy conversion and request validation with messages that name the field."""

from __future__ import annotations

import numpy as np

from slonn.protos import slonn_pb2 as pb

_DTYPES = {pb.FLOAT32: np.dtype("<f4")}
_F32 = np.dtype(np.float32)


class TensorError(ValueError):
    """A tensor field is wrong; the message names the field and the expected value."""


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """A float32 numpy array as a little-endian Tensor message."""
    arr = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(shape=list(arr.shape), dtype=pb.FLOAT32, data=arr.tobytes())


def from_tensor(t: pb.Tensor, field: str = "input", expected_features: int | None = None) -> np.ndarray:
    """Decode and validate one sample: shape [F] or [1, F], FLOAT32, exact byte count, finite values.

    Returns a 1-D float32 array of F features (read-only: a view of the message's bytes, copied only where
    the host's float32 is not little-endian).
    """
    return _decode(t, field, expected_features, 1).reshape(-1)


def samples_from_tensor(t: pb.Tensor, field: str, expected_features: int | None, max_samples: int,
                        limit: str = "max_batch") -> np.ndarray:
    """Decode and validate N samples: shape [F] (one sample) or [N, F] with 1 <= N <= ``max_samples``,
    FLOAT32, exact byte count, finite values. Returns an [N, F] float32 array (read-only, as from_tensor's).
    ``limit`` names the setting ``max_samples`` comes from, for the error message."""
    return _decode(t, field, expected_features, max_samples, limit)


def _decode(t: pb.Tensor, field: str, expected_features: int | None, max_samples: int,
            limit: str = "max_batch") -> np.ndarray:
    dtype = _DTYPES.get(t.dtype)
    if dtype is None:
        raise TensorError(f"{field}.dtype: got {pb.DataType.Name(t.dtype) if t.dtype in pb.DataType.values() else t.dtype}, expected FLOAT32")
    shape = list(t.shape)
    # The checks run on every request: the error messages are built only when one fails.
    if not shape:
        raise TensorError(f"{field}.shape: missing{_expected(expected_features, max_samples)}")
    if min(shape) < 0:
        raise TensorError(f"{field}.shape: {shape} has a negative dimension{_expected(expected_features, max_samples)}")
    if 0 in shape:
        raise TensorError(f"{field}.shape: {shape} is an empty tensor{_expected(expected_features, max_samples)}")
    if len(shape) > 2:
        raise TensorError(f"{field}.shape: got {shape}{_expected(expected_features, max_samples)}")
    n = shape[0] if len(shape) == 2 else 1
    features = shape[-1]
    if expected_features is not None and features != expected_features:
        raise TensorError(f"{field}.shape: got {shape}: {features} features, the model takes {expected_features}"
                          f"{_expected(expected_features, max_samples)}")
    if n > max_samples:
        per = "one sample per request" if max_samples == 1 else (
            f"{n} samples, at most {max_samples} per request ({limit}={max_samples})")
        raise TensorError(f"{field}.shape: got {shape}, {per}{_expected(expected_features, max_samples)}")
    want = n * features * dtype.itemsize
    if len(t.data) != want:
        raise TensorError(f"{field}.data: {len(t.data)} bytes for shape {shape}, expected {want} "
                          f"({n * features} x {dtype.name} little-endian)")
    arr = np.frombuffer(t.data, dtype=dtype)
    if dtype != _F32:
        arr = arr.astype(_F32)
    if not np.isfinite(arr).all():
        raise TensorError(f"{field}.data: contains NaN or inf; all values must be finite")
    return arr.reshape(n, features)


def _expected(features: int | None, max_samples: int = 1) -> str:
    if features is None:
        return ""
    if max_samples == 1:
        return f" (expected [{features}] or [1, {features}])"
    return f" (expected [{features}], or [N, {features}] with 1 <= N <= {max_samples})"
