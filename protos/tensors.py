"""Tensor <-> numpy conversion and request validation with messages that name the field."""

from __future__ import annotations

import numpy as np

from slonn.protos import slonn_pb2 as pb

_DTYPES = {pb.FLOAT32: np.dtype("<f4")}


class TensorError(ValueError):
    """A tensor field is wrong; the message names the field and the expected value."""


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """A float32 numpy array as a little-endian Tensor message."""
    arr = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(shape=list(arr.shape), dtype=pb.FLOAT32, data=arr.tobytes())


def from_tensor(t: pb.Tensor, field: str = "input", expected_features: int | None = None) -> np.ndarray:
    """Decode and validate one sample: shape [F] or [1, F], FLOAT32, exact byte count, finite values.

    Returns a 1-D float32 array of F features.
    """
    expected = "" if expected_features is None else f" (expected [{expected_features}] or [1, {expected_features}])"
    if t.dtype not in _DTYPES:
        raise TensorError(f"{field}.dtype: got {pb.DataType.Name(t.dtype) if t.dtype in pb.DataType.values() else t.dtype}, expected FLOAT32")
    shape = list(t.shape)
    if not shape:
        raise TensorError(f"{field}.shape: missing{expected}")
    if any(d < 0 for d in shape):
        raise TensorError(f"{field}.shape: {shape} has a negative dimension{expected}")
    if any(d == 0 for d in shape):
        raise TensorError(f"{field}.shape: {shape} is an empty tensor{expected}")
    if len(shape) > 2 or (len(shape) == 2 and shape[0] != 1):
        raise TensorError(f"{field}.shape: got {shape}, one sample per request{expected}")
    features = shape[-1]
    if expected_features is not None and features != expected_features:
        raise TensorError(f"{field}.shape: got {shape}{expected}")
    dtype = _DTYPES[t.dtype]
    want = features * dtype.itemsize
    if len(t.data) != want:
        raise TensorError(f"{field}.data: {len(t.data)} bytes for shape {shape}, expected {want} "
                          f"({features} x {dtype.name} little-endian)")
    arr = np.frombuffer(t.data, dtype=dtype).astype(np.float32)
    if not np.isfinite(arr).all():
        raise TensorError(f"{field}.data: contains NaN or inf; all values must be finite")
    return arr
