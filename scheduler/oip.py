"""The Open Inference Protocol (KServe v2), protocol-neutral: models' metadata, tensors in, answers out.

oip_grpc.py (package ``inference`` over gRPC) and oip_http.py (``/v2/...`` over HTTP/REST) translate their
wire formats to and from these functions; both admit through scheduler/admission.py, on one dispatcher.

A request carries one input tensor named ``input`` of shape [N, features]: N samples with one deadline,
answered in one response in input order (output ``output``, FP32 [N, classes]). The SLO class and a latency
budget travel as request parameters ``slo_class`` and ``latency_budget_ms``.
"""

from __future__ import annotations

import json

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from slonn.scheduler.dispatcher import Completion
from slonn.scheduler.errors import InvalidArgument, NotFound, RequestError
from slonn.scheduler.metrics import UNKNOWN, ServerMetrics
from slonn.workers.artifact import ModelManifest

INPUT, OUTPUT = "input", "output"
VERSION = "1"
"""Every model is served at one version."""
PLATFORM = "slonn_mlp"
SERVER_NAME = "slonn"
EXTENSIONS = ("binary_tensor_data", "parameters")

_WIRE = {"FP32": "<f4", "FP16": "<f2", "FP64": "<f8", "BF16": "<u2", "INT8": "i1", "INT16": "<i2",
         "INT32": "<i4", "INT64": "<i8", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8"}
"""Input datatypes accepted, with their little-endian wire dtype; all are converted to FP32."""
_EXACT_INT = 1 << 24
"""Integers up to this magnitude are exact in FP32; larger ones are refused, not rounded."""
_FP32_MAX = float(np.finfo(np.float32).max)


def accepted_datatypes() -> tuple[str, ...]:
    return tuple(_WIRE)


@dataclass(frozen=True)
class Request:
    """An infer request, decoded: which model, which class and budget, the samples."""

    model: str
    slo_class: str
    budget_ms: float
    samples: np.ndarray
    """[N, features] float32."""


def tensor_metadata(manifest: ModelManifest) -> tuple[dict, dict]:
    """The input and output as ModelMetadata describes them (-1: the number of samples in a request)."""
    return ({"name": INPUT, "datatype": "FP32", "shape": [-1, manifest.arch.in_features]},
            {"name": OUTPUT, "datatype": "FP32", "shape": [-1, manifest.arch.out_features]})


def model_parameters(manifest: ModelManifest) -> dict[str, str]:
    """What slonn.v1's ListModels says beyond the tensors, as JSON strings: the input contract (features, names,
    dtype, training range, preprocessing the server applies), the label names and each level's accuracy. HTTP
    metadata carries them as ``parameters``; gRPC ModelConfig as its ``parameters`` map."""
    return {"input_contract": json.dumps(manifest.contract.to_json()),
            "labels": json.dumps(list(manifest.labels)),
            "levels": json.dumps({f"{lv:g}": manifest.accuracy[lv] for lv in manifest.levels})}


def model_metadata(manifest: ModelManifest) -> dict:
    inp, out = tensor_metadata(manifest)
    return {"name": manifest.name, "versions": [VERSION], "platform": PLATFORM, "inputs": [inp], "outputs": [out],
            "parameters": model_parameters(manifest)}


def find_model(manifests: dict[str, ModelManifest], name: str, version: str = "") -> ModelManifest:
    """The served model ``name`` (at ``version``, if given), else NOT_FOUND naming the served ones."""
    if not name:
        raise InvalidArgument(f"model name: must be set; served models: {sorted(manifests)}")
    manifest = manifests.get(name)
    if manifest is None:
        raise NotFound(f"model {name!r} is not served; served models: {sorted(manifests)}")
    if version and version != VERSION:
        raise NotFound(f"model {name!r} version {version!r} is not served; versions: [{VERSION!r}]")
    return manifest


def read_parameters(params: dict[str, Any], default_class: str) -> tuple[str, float]:
    """(slo_class, latency_budget_ms) from request parameters; the server's default class when absent."""
    slo_class = params.get("slo_class", "")
    if not isinstance(slo_class, str):
        raise InvalidArgument(f"parameters.slo_class: got {slo_class!r}, expected a string")
    budget = params.get("latency_budget_ms", 0.0)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise InvalidArgument(f"parameters.latency_budget_ms: got {budget!r}, expected a number of ms")
    return slo_class or default_class, float(budget)


def decode_samples(manifest: ModelManifest, field: str, datatype: str, shape: Sequence[int],
                   raw: bytes | None, values: Any, max_samples: int, limit: str = "max_batch") -> np.ndarray:
    """One input tensor as [N, features] float32: checked shape, byte or value count, exact conversion.

    ``max_samples``: the most samples one request may carry (the server's ``sample_limit``); ``limit`` names
    the setting it comes from, for the error message.

    ``raw``: little-endian bytes (raw_input_contents, binary tensor data); else ``values``: the typed
    contents or JSON data (nested lists are flattened in C order).
    """
    features = manifest.arch.in_features
    want = f"expected [N, {features}] with 1 <= N <= {max_samples}"
    if datatype not in _WIRE:
        raise InvalidArgument(f"{field}.datatype: got {datatype!r}; expected FP32 (or one of "
                              f"{', '.join(k for k in _WIRE if k != 'FP32')}, converted to FP32)")
    shape = [int(d) for d in shape]
    if len(shape) == 2 and shape[1] == features and shape[0] > max_samples:
        raise InvalidArgument(f"{field}.shape: got {shape}, {shape[0]} samples, at most {max_samples} per request "
                              f"({limit}={max_samples})")
    if len(shape) != 2 or shape[1] != features or not 1 <= shape[0]:
        raise InvalidArgument(f"{field}.shape: got {shape}, {want}")
    count = shape[0] * features
    wire = np.dtype(_WIRE[datatype])
    if raw is not None:
        if len(raw) != count * wire.itemsize:
            raise InvalidArgument(f"{field}: {len(raw)} bytes of data for shape {shape}, expected "
                                  f"{count * wire.itemsize} ({count} x {datatype})")
        arr = np.frombuffer(raw, dtype=wire)
        if datatype == "BF16":  # bfloat16 is the top half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
    else:
        try:
            arr = np.asarray(values, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise InvalidArgument(f"{field}.data: not a list of numbers of shape {shape}") from None
        if arr.size != count:
            raise InvalidArgument(f"{field}.data: {arr.size} values for shape {shape}, expected {count}")
    return _to_fp32(arr, field, datatype).reshape(shape)


def _to_fp32(arr: np.ndarray, field: str, datatype: str) -> np.ndarray:
    """FP32 exactly where the values allow it; INVALID_ARGUMENT naming the field where they do not."""
    if datatype.startswith(("INT", "UINT")):
        if arr.size and np.abs(arr.astype(np.float64)).max() > _EXACT_INT:
            raise InvalidArgument(f"{field}: {datatype} values beyond +-2^24 are not exact in FP32; "
                                  "send FP32")
        return arr.astype(np.float32)
    wide = arr.astype(np.float64)
    if not np.isfinite(wide).all():
        raise InvalidArgument(f"{field}: contains NaN or inf; all values must be finite")
    if wide.size and np.abs(wide).max() > _FP32_MAX:
        raise InvalidArgument(f"{field}: {datatype} values beyond FP32's range")
    return wide.astype(np.float32)  # FP64 rounds to the nearest FP32 (relative error < 6e-8)


def summary_parameters(done: list[Completion], server_ms: float) -> dict[str, Any]:
    """The response's parameters, as slonn.v1's InferResponse fields; over N samples, the worst case
    (the lowest level and its accuracy, the longest times, the largest batch, late if any was late)."""
    low = min(done, key=lambda c: c.level)
    return {"level": low.level, "expected_accuracy": low.expected_accuracy,
            "queue_ms": max(c.queue_ms for c in done), "exec_ms": max(c.exec_ms for c in done),
            "predicted_ms": max(c.predicted_ms for c in done), "batch_size": max(c.batch_size for c in done),
            "late": any(c.late for c in done), "kernel": ",".join(sorted({c.kernel for c in done})),
            "server_ms": server_ms}


def outputs(done: list[Completion]) -> np.ndarray:
    return np.ascontiguousarray(np.stack([c.output for c in done]), dtype="<f4")


def count_error(metrics: ServerMetrics, manifests: dict, classes: dict, model: str, slo_class: str,
                exc: RequestError, samples: int = 1) -> None:
    """Count an infer call's error in the metrics unless the dispatcher already did."""
    if exc.counted:
        return
    exc.counted = True
    metrics.reject(model if model in manifests else UNKNOWN, slo_class if slo_class in classes else UNKNOWN,
                   exc.kind.value, samples)
