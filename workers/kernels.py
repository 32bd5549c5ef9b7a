"""Kernels that run an SLO-aware MLP at a level: dense, per-sample gather, union gather-GEMM.

Every kernel computes the reference semantics of :class:`workers.model.SLOAwareMLP`
(per-input top-k of each hidden layer's pre-activations, then ReLU) and differs
only in how it multiplies the sparse hidden vector ``h`` by the next layer's
weights. Sparsity is used on the *input* side of layers 2.. and the head: only
the units a sample kept (and that survived ReLU) contribute, so only those rows
of ``W.T`` are read.

- ``dense``: ``linear`` on the masked ``h``. Reads every weight; best when the
  batch's union of kept units is most of the layer (large batches, keep 1.0).
  It uses ``W`` in nn.Linear's own (out x in) layout, a second fp32 copy beside
  ``W.T``: with ``W.T`` as the GEMM's right operand, MKL's single-thread sgemm
  ran 25-35% slower on 4096 x 4096 at every batch size (2.6 vs 3.8 ms at batch
  1, 15.5 vs 20.8 ms at batch 64), which made "dense" slower than the plain
  torch model it is compared with.
- ``gather``: per-sample gather. ``embedding_bag(idx, W.T, per_sample_weights=v)``
  sums, for each sample, its own selected rows of ``W.T`` (no weight copy).
  Exact up to float summation order. Best at small batches.
- ``union``: union gather-GEMM. Rows of ``W.T`` that *any* sample needs are
  gathered once and one GEMM runs on the matching columns of ``h``; each
  sample's own mask is already in ``h`` (zeros elsewhere), so it is exact. Falls
  back to dense (``W`` layout) per layer when the union covers most of the layer.
- ``gather_bf16`` / ``gather_fp16``: the per-sample gather over a half-precision
  copy of ``W.T`` (fp32 accumulation inside embedding_bag; the layer output is
  rounded to half and the bias added in fp32).
- ``dense_bf16`` / ``dense_fp16``: ``linear`` on the masked ``h`` rounded to
  half, over a half copy of ``W`` (oneDNN accumulates in fp32; on CPUs with
  AMX or AVX512-BF16 a bf16 GEMM at batch 16 ran ~4x faster than fp32 sgemm;
  elsewhere it is slow and the chooser does not pick it). The output is
  rounded to half and the bias added in fp32. At level 1.0 it is the plain
  model in half precision after the fp32 first layer: half activations,
  bias inside the GEMM.
- ``fused`` / ``fused_bf16`` (CPU, where :mod:`workers.native` builds): the whole forward in one C++ call,
  per sample a radix top-k of each layer and the sum of its kept, positive rows of ``W.T`` (fp32 or bf16
  rows, fp32 accumulation, nothing rounded to half between layers); at batch 1 ~2x the torch gathers.

The half kernels are not bit-comparable with the reference; their accuracy is
measured by ``scripts/bench_kernels.py``.

GELU and SiLU models (imported) keep each input's units of largest activation
magnitude, which may be negative: they run the exact kernels only ("dense",
"gather", "union" over the activation's values; the fused and half kernels
assume ReLU).

Selection: every kernel keeps each row's k largest fp32 pre-activations
(:func:`select_topk`). On the CPU from two rows that is numpy's
``argpartition`` (introselect), 3-3.5x faster than ``torch.topk`` there (16 x
4096, k = 410: 0.12 vs 0.44 ms; 64 rows: 0.54 vs 1.77 ms a layer, which made a
masked dense GEMM at batch 64 cost 1.7x the plain one); at one row and on a GPU
``torch.topk``.
Both pick the same set, so kernels agree with the reference unless two
pre-activations at the k-th place are equal up to summation-order noise.

The measured choice of kernel per (batch size, level) lives in
:mod:`workers.kernels_chooser`.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from slonn.workers import native
from slonn.workers.model import SLOAwareMLP, activate, kept_units

EXACT_KERNELS: tuple[str, ...] = ("dense", "gather", "union")
"""Kernels equal to the reference up to float summation order that every layout has."""
NATIVE_KERNEL = "fused"
"""The native fused per-sample forward (:mod:`workers.native`) over fp32 weights: exact like "gather", offered
where the library builds (CPU); ``fused_bf16`` is the same over the bf16 weights."""
LOW_PRECISION_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
POSITIVE_FILTER_MIN_KEEP = 0.25
"""Gather kernels drop non-positive kept units from keep >= this: there ReLU zeroes many of them (at keep 0.5
about 80% of layer 2's on digits); below it nearly all kept units are positive and the boolean indexing
(~50 us a layer at batch 1) costs more than the rows it saves."""
NUMPY_SELECT_MIN_ROWS = 2
"""CPU rows from which :func:`select_topk` uses numpy's argpartition. At one row it is faster alone (15 vs
34 us) but the whole batch-1 forward ran ~40 us slower with it (722 vs 683 us at keep 0.1, alternating
blocks of 250 calls; cause not found), so one row keeps torch.topk."""
UNION_DENSE_FRACTION = 0.75
"""Union kernel: above this fraction of a layer's inputs in the batch union, gathering costs more than it saves."""


@dataclass
class SparseLayer:
    """One layer fed by a sparse hidden vector: weights input-major (``W.T``) for the gathers, and
    output-major (``W``) for the dense GEMMs."""

    w: torch.Tensor
    """out x in float32, contiguous (nn.Linear's layout): the operand of the dense GEMMs."""
    wt: torch.Tensor
    """in x out float32, contiguous: row j is the weights leaving input unit j (gathers)."""
    bias: torch.Tensor
    """out, float32."""
    wt_low: torch.Tensor | None
    """``wt`` in the low precision, or None when no low-precision kernel is built."""
    w_low: torch.Tensor | None = None
    """``w`` in the low precision, or None."""
    bias_low: torch.Tensor | None = None
    """``bias`` in the low precision, or None (the all-half dense forward at level 1.0)."""


@dataclass
class SparseMLP:
    """Weights of an SLO-aware MLP laid out for the kernels (see module docstring)."""

    first_w: torch.Tensor
    """hidden[0] x in_features float32, with the input standardisation folded in."""
    first_b: torch.Tensor
    """hidden[0] float32, with the input standardisation folded in."""
    layers: list[SparseLayer]
    """Hidden layers 2.. then the head."""
    input_mean: torch.Tensor
    """in_features: the model's input standardisation (kept to synthesise calibration inputs)."""
    input_std: torch.Tensor
    """in_features."""
    low_precision: str | None = "bf16"
    """Name of the half-precision weight copies ("bf16", "fp16") or None for fp32 only."""
    activation: str = "relu"
    """The model's hidden activation (``workers.model.ACTIVATIONS``)."""
    _native: dict[bool, "_NativePlan"] = field(default_factory=dict, init=False, repr=False, compare=False)
    """Argument arrays of the native forward, per weight precision (True: bf16), built on first use."""

    @classmethod
    def from_model(cls, model: SLOAwareMLP, device: torch.device,
                   low_precision: str | None = "bf16") -> "SparseMLP":
        """Lay out ``model``'s weights on ``device``; ``low_precision`` adds half copies of every ``W`` and
        ``W.T``."""
        if low_precision is not None and low_precision not in LOW_PRECISION_DTYPES:
            raise ValueError(f"low_precision={low_precision!r} must be one of {sorted(LOW_PRECISION_DTYPES)} or None")
        with torch.no_grad():
            first = model.hidden[0]
            # (x - mean) / std @ W.T + b  ==  x @ (W / std).T + (b - W @ (mean / std))
            w = first.weight.detach().float() / model.input_std.float()
            b = first.bias.detach().float() - w @ model.input_mean.float()
            layers = []
            for lin in [*model.hidden[1:], model.head]:
                w_out_in = lin.weight.detach().float().contiguous().to(device)
                wt = w_out_in.t().contiguous()
                dtype = None if low_precision is None else LOW_PRECISION_DTYPES[low_precision]
                layers.append(SparseLayer(w_out_in, wt, lin.bias.detach().float().to(device),
                                          None if dtype is None else wt.to(dtype),
                                          None if dtype is None else w_out_in.to(dtype),
                                          None if dtype is None else lin.bias.detach().to(device, dtype)))
        return cls(w.contiguous().to(device), b.to(device), layers, model.input_mean.detach().float().to(device),
                   model.input_std.detach().float().to(device), low_precision, model.arch.activation)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the native plan behind (ctypes pointers into this object's tensors)."""
        return {**self.__dict__, "_native": {}}

    @property
    def kernels(self) -> tuple[str, ...]:
        """Kernels this layout can run: the exact ones, the half ones of its low precision, and the native
        fused forward where it builds (CPU only; its half variant for bf16 only)."""
        if self.activation != "relu":
            return EXACT_KERNELS
        lp = self.low_precision
        out = EXACT_KERNELS + (() if lp is None else (f"gather_{lp}", f"dense_{lp}"))
        if self.device.type == "cpu" and native.available():
            # First: calibration times kernels in this order and gives up on one after a single call 1.5x
            # slower than the best so far, so the fastest sparse kernels measured first keep start-up short.
            out = ((f"{NATIVE_KERNEL}_bf16",) if lp == "bf16" else ()) + (NATIVE_KERNEL,) + out
        return out

    @property
    def device(self) -> torch.device:
        return self.first_w.device

    @property
    def in_features(self) -> int:
        return self.first_w.shape[1]

    def forward(self, x: torch.Tensor, keep: float, kernel: str = "dense") -> torch.Tensor:
        """Logits (batch x out, float32) of ``x`` (raw inputs, batch x in) at level ``keep``."""
        if kernel not in self.kernels:
            raise ValueError(f"kernel={kernel!r} is not one of {self.kernels}")
        if self.activation != "relu":
            return self._forward_magnitude(x, keep, kernel)
        if kernel.startswith(NATIVE_KERNEL):
            return self._forward_native(x, keep, bf16=kernel != NATIVE_KERNEL)
        z = torch.addmm(self.first_b, x, self.first_w.t())
        if kernel.startswith("dense"):
            return self._forward_dense(z, keep, low=kernel != "dense")
        if kernel == "union":
            for layer in self.layers:
                z = _union_gemm(layer, *_select(z, keep))
            return z
        low = kernel != "gather"
        for layer in self.layers:
            z = _gather(layer, *_select(z, keep), low=low, drop_zeros=keep >= POSITIVE_FILTER_MIN_KEEP)
        return z

    def _forward_native(self, x: torch.Tensor, keep: float, bf16: bool) -> torch.Tensor:
        plan = self._native.get(bf16)
        if plan is None:
            plan = self._native[bf16] = _NativePlan.build(self, bf16)
        # The C++ side trusts what it is given: every shape and pointer comes from the plan, checked here.
        if x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != plan.in_features:
            raise ValueError(f"x is {tuple(x.shape)} on {x.device}; expected (batch, {plan.in_features}) on the CPU")
        x = x.to(torch.float32).contiguous()
        out = torch.empty(x.shape[0], plan.out_features, dtype=torch.float32)
        rc = plan.lib.slonn_sparse_forward(
            x.shape[0], x.data_ptr(), plan.in_features, plan.first_wt.data_ptr(), plan.first_b.data_ptr(),
            plan.first_b.shape[0], len(plan.widths), plan.wts, plan.biases, plan.outs, plan.kept(keep),
            int(bf16), out.data_ptr())
        if rc != 0:
            raise RuntimeError(f"native sparse forward refused its arguments (rc={rc})")
        return out

    def _forward_magnitude(self, x: torch.Tensor, keep: float, kernel: str) -> torch.Tensor:
        """GELU/SiLU: each layer keeps the units of largest activation magnitude (fp32, exact kernels)."""
        z = torch.addmm(self.first_b, x, self.first_w.t())
        for layer in self.layers:
            a = activate(z, self.activation)
            if keep >= 1.0:
                idx = torch.arange(a.shape[-1], device=a.device).expand_as(a)
                v = a
            else:
                idx = select_topk(a.abs(), kept_units(keep, a.shape[-1]))[1]
                v = a.gather(1, idx)
            if kernel == "gather":
                z = torch.add(layer.bias, F.embedding_bag(idx, layer.wt, None, mode="sum", per_sample_weights=v))
            elif kernel == "union":
                z = _union_gemm(layer, v, idx)
            else:
                h = a if keep >= 1.0 else torch.zeros_like(a).scatter_(1, idx, v)
                z = F.linear(h, layer.w, layer.bias)
        return z

    def _forward_dense(self, z: torch.Tensor, keep: float, low: bool = False) -> torch.Tensor:
        if low and keep >= 1.0:
            # The plain model in half precision after the (fp32, 64-input) first layer, what the chooser falls
            # back to: activations stay half from layer to layer and the GEMM adds the bias (no round trip
            # through fp32 per layer: at batch 64 that cost 2-9% against the all-half module). The logits are
            # rounded to half before the cast back, as the plain half model's are.
            z = z.to(self.layers[0].w_low.dtype)
            for layer in self.layers:
                z = F.linear(z.relu_(), layer.w_low, layer.bias_low)
            return z.float()
        for layer in self.layers:
            if keep < 1.0:
                v, idx = select_topk(z, kept_units(keep, z.shape[-1]))
                z = torch.zeros_like(z).scatter_(1, idx, v)
            if low:  # half GEMM, fp32 bias: same rounding as the half gathers
                z = torch.add(layer.bias, F.linear(z.relu_().to(layer.w_low.dtype), layer.w_low))
            else:
                z = F.linear(z.relu_(), layer.w, layer.bias)
        return z


@dataclass
class _NativePlan:
    """What :func:`workers.native` needs for one weight precision: pointer arrays into the tensors of a
    :class:`SparseMLP` (which they keep alive) and, per level, each layer's kept-unit count."""

    lib: ctypes.CDLL
    first_wt: torch.Tensor
    """in_features x hidden[0] fp32 (the first layer's ``W.T``, input scaling folded in)."""
    first_b: torch.Tensor
    tensors: list[torch.Tensor]
    wts: ctypes.Array
    biases: ctypes.Array
    outs: ctypes.Array
    widths: list[int]
    """Input width of each layer fed by a sparse vector (hidden layers 2.., head)."""
    _kept: dict[float, ctypes.Array] = field(default_factory=dict)

    @classmethod
    def build(cls, sparse: "SparseMLP", bf16: bool) -> "_NativePlan":
        lib = native.library()
        if lib is None or sparse.device.type != "cpu":
            raise ValueError(f"the native kernels need a CPU layout and a built library "
                             f"({native.unavailable_reason() or sparse.device})")
        wts = [layer.wt_low if bf16 else layer.wt for layer in sparse.layers]
        if bf16 and any(w is None or w.dtype != torch.bfloat16 for w in wts):
            raise ValueError("fused_bf16 needs bf16 weight copies (low_precision='bf16')")
        tensors = [w.contiguous() for w in wts] + [layer.bias.contiguous() for layer in sparse.layers]
        n = len(sparse.layers)
        ptrs = ctypes.c_void_p * n
        return cls(lib, sparse.first_w.t().contiguous(), sparse.first_b.contiguous(), tensors,
                   ptrs(*(t.data_ptr() for t in tensors[:n])), ptrs(*(t.data_ptr() for t in tensors[n:])),
                   (ctypes.c_int64 * n)(*(layer.wt.shape[1] for layer in sparse.layers)),
                   [layer.wt.shape[0] for layer in sparse.layers])

    @property
    def in_features(self) -> int:
        return self.first_wt.shape[0]

    @property
    def out_features(self) -> int:
        return self.outs[len(self.widths) - 1]

    def kept(self, keep: float) -> ctypes.Array:
        arr = self._kept.get(keep)
        if arr is None:
            arr = self._kept[keep] = (ctypes.c_int64 * len(self.widths))(
                *(kept_units(keep, w) for w in self.widths))
        return arr


def select_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` largest values of ``z`` (batch x n, fp32) and their indices, in no order.

    The set ``torch.topk(z, k, sorted=False)`` picks (up to ties at the k-th place), faster on the CPU.
    """
    if z.device.type != "cpu" or z.dtype != torch.float32 or z.shape[0] < NUMPY_SELECT_MIN_ROWS:
        return torch.topk(z, k, dim=-1, sorted=False)
    zn = z.detach().contiguous().numpy()
    n = zn.shape[-1]
    idx = np.ascontiguousarray(np.argpartition(zn, n - k, axis=-1)[:, n - k:])
    return torch.from_numpy(np.take_along_axis(zn, idx, -1)), torch.from_numpy(idx.astype(np.int64, copy=False))


def _select(z: torch.Tensor, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's kept values after ReLU (zeros where not positive) and their unit indices."""
    if keep >= 1.0:
        idx = torch.arange(z.shape[-1], device=z.device).expand_as(z)
        return z.relu(), idx
    v, idx = select_topk(z, kept_units(keep, z.shape[-1]))
    return v.relu_(), idx


def _positive_bags(v: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten each sample's positive (value, index) pairs into embedding_bag's 1-D input + offsets.

    ReLU leaves many kept units at zero at keep >= 0.25 (and at keep 1.0 most of
    a layer): skipping them is exact and saves a row read each.
    """
    pos = v > 0
    offsets = torch.zeros(v.shape[0], dtype=torch.long, device=v.device)
    if v.shape[0] > 1:
        torch.cumsum(pos.sum(1)[:-1], 0, out=offsets[1:])
    return v[pos], idx[pos], offsets


def _gather(layer: SparseLayer, v: torch.Tensor, idx: torch.Tensor, low: bool, drop_zeros: bool) -> torch.Tensor:
    """bias + sum over each sample's kept units j of v_j * W.T[j], reading only those rows."""
    wt = layer.wt_low if low else layer.wt
    if drop_zeros:
        v, idx, offsets = _positive_bags(v, idx)
    else:
        offsets = None  # 2-D input: one bag per row, zeros contribute nothing
    out = F.embedding_bag(idx, wt, offsets, mode="sum", per_sample_weights=v.to(wt.dtype))
    return torch.add(layer.bias, out)  # fp32 bias + (fp32 or half) sum -> fp32


def _union_gemm(layer: SparseLayer, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    width = layer.wt.shape[0]
    if idx.shape[1] == width:  # keep 1.0: v is the whole ReLU output
        h = v
    else:
        h = torch.zeros(v.shape[0], width, dtype=v.dtype, device=v.device).scatter_(1, idx, v)
    union = torch.nonzero(h.any(0)).squeeze(1)
    if union.numel() > UNION_DENSE_FRACTION * h.shape[1]:
        return F.linear(h, layer.w, layer.bias)
    return torch.addmm(layer.bias, h.index_select(1, union), layer.wt.index_select(0, union))


__all__ = ["EXACT_KERNELS", "SparseLayer", "SparseMLP", "select_topk"]
