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
    dtype = _DTYPES.get(t.dtype)
    if dtype is None:
        raise TensorError(f"{field}.dtype: got {pb.DataType.Name(t.dtype) if t.dtype in pb.DataType.values() else t.dtype}, expected FLOAT32")
    shape = list(t.shape)
    # The checks run on every request: the error messages are built only when one fails.
    if not shape:
        raise TensorError(f"{field}.shape: missing{_expected(expected_features)}")
    if min(shape) < 0:
        raise TensorError(f"{field}.shape: {shape} has a negative dimension{_expected(expected_features)}")
    if 0 in shape:
        raise TensorError(f"{field}.shape: {shape} is an empty tensor{_expected(expected_features)}")
    if len(shape) > 2 or (len(shape) == 2 and shape[0] != 1):
        raise TensorError(f"{field}.shape: got {shape}, one sample per request{_expected(expected_features)}")
    features = shape[-1]
    if expected_features is not None and features != expected_features:
        raise TensorError(f"{field}.shape: got {shape}{_expected(expected_features)}")
    want = features * dtype.itemsize
    if len(t.data) != want:
        raise TensorError(f"{field}.data: {len(t.data)} bytes for shape {shape}, expected {want} "
                          f"({features} x {dtype.name} little-endian)")
    arr = np.frombuffer(t.data, dtype=dtype)
    if dtype != _F32:
        arr = arr.astype(_F32)
    if not np.isfinite(arr).all():
        raise TensorError(f"{field}.data: contains NaN or inf; all values must be finite")
    return arr


def _expected(features: int | None) -> str:
    return "" if features is None else f" (expected [{features}] or [1, {features}])"
