"""Reading a user's MLP: the stack of Linear layers in a state dict or an ``nn.Sequential``.

The architecture comes from the weights' shapes and order: every layer is ``<name>.weight`` (out x in) with
an optional ``<name>.bias`` (out), each layer takes what the one before gives, and the last is the head.
Files are read without unpickling arbitrary objects: safetensors, or ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slonn.workers.model import ACTIVATIONS, MLPArchitecture, SLOAwareMLP

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_SKIPPED_MODULES = (nn.Dropout, nn.Identity, nn.Flatten)
"""Modules of an nn.Sequential that do nothing at inference on a batch of feature vectors."""


class ArchitectureError(ValueError):
    """The weights are not a stack of Linear layers slonn can serve; the message names the layer."""


@dataclass(frozen=True)
class LinearLayer:
    """One Linear layer of the user's model."""

    name: str
    """Its name in the state dict (``0``, ``fc1``, ``layers.2``) or its index in the Sequential."""
    weight: torch.Tensor
    """out x in."""
    bias: torch.Tensor
    """out (zeros when the layer had none)."""


@dataclass(frozen=True)
class LinearStack:
    """The user's MLP: Linear layers in order with one activation between them."""

    layers: tuple[LinearLayer, ...]
    activation: str

    @property
    def arch(self) -> MLPArchitecture:
        first, *_, last = self.layers
        return MLPArchitecture(int(first.weight.shape[1]), tuple(int(lay.weight.shape[0]) for lay in self.layers[:-1]),
                               int(last.weight.shape[0]), self.activation)

    def to_model(self) -> SLOAwareMLP:
        """An SLO-aware MLP with these weights (input preprocessing: none; set its buffers to change that)."""
        model = SLOAwareMLP(self.arch)
        with torch.no_grad():
            for target, layer in zip([*model.hidden, model.head], self.layers):
                target.weight.copy_(layer.weight)
                target.bias.copy_(layer.bias)
        return model.eval()


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or a ``.pt`` state dict (loaded with ``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"weights file {path}: expected a {SAFETENSORS_SUFFIXES + TORCH_SUFFIXES} file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any refusal is the same answer to the user
        raise ValueError(f"weights file {path}: not a plain state dict readable with weights_only=True "
                         f"(save model.state_dict(), not the model object): {exc}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # a checkpoint dict that wraps the state dict
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights file {path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return dict(obj)


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _group(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors by layer name, in the state dict's own order; anything but weight/bias is an error."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        prefix, _, param = key.rpartition(".")
        if param not in ("weight", "bias"):
            raise ArchitectureError(
                f"tensor {key!r}: only Linear layers (<name>.weight, <name>.bias) are supported; "
                "normalisation layers, embeddings and buffers are not")
        groups.setdefault(prefix, {})[param] = value
    return groups


def _layer(name: str, params: dict[str, torch.Tensor]) -> LinearLayer:
    label = f"layer {name!r}" if name else "the unnamed layer"
    w = params.get("weight")
    if w is None:
        raise ArchitectureError(f"{label}: has a bias but no weight")
    if w.dim() != 2:
        raise ArchitectureError(f"{label}: weight has shape {list(w.shape)}; a Linear weight is 2-D (out x in) "
                                "(a 1-D weight is a normalisation layer, which is not supported)")
    b = params.get("bias")
    if b is None:
        b = torch.zeros(w.shape[0], dtype=w.dtype)
    elif b.shape != (w.shape[0],):
        raise ArchitectureError(f"{label}: bias has shape {list(b.shape)}, its weight has {w.shape[0]} outputs")
    if not (w.is_floating_point() and b.is_floating_point()):
        raise ArchitectureError(f"{label}: weights of dtype {w.dtype} are not floating point")
    return LinearLayer(name, w.detach().float().contiguous(), b.detach().float().contiguous())


def _chain_error(layers: list[LinearLayer]) -> str | None:
    for prev, cur in zip(layers, layers[1:]):
        if cur.weight.shape[1] != prev.weight.shape[0]:
            return (f"layer {cur.name!r} (weight {list(cur.weight.shape)}) takes {cur.weight.shape[1]} inputs but "
                    f"layer {prev.name!r} before it gives {prev.weight.shape[0]} outputs")
    return None


def stack_from_state_dict(state: Mapping[str, torch.Tensor], activation: str = "relu",
                          order: tuple[str, ...] | None = None) -> LinearStack:
    """The Linear stack in ``state``: layers in ``order`` (their names) if given, else in the state dict's own
    order or, when that does not chain (safetensors files store names sorted), in natural name order."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} must be one of {ACTIVATIONS}")
    groups = _group(state)
    if order is not None:
        unknown = [n for n in order if n not in groups]
        if unknown:
            raise ArchitectureError(f"layers {unknown} are not in the weights; its layers: {sorted(groups)}")
        unused = sorted(set(groups) - set(order))
        if unused:
            raise ArchitectureError(f"layers {unused} are in the weights but not in the order given")
        candidates = [list(order)]
    else:
        candidates = [list(groups), sorted(groups, key=_natural_key)]
    if len(groups) < 2:
        raise ArchitectureError(f"found {len(groups)} Linear layer(s) {sorted(groups)}; an MLP has at least two "
                                "(one hidden layer and the head)")
    error = None
    for names in candidates:
        layers = [_layer(n, groups[n]) for n in names]
        error = _chain_error(layers)
        if error is None:
            return LinearStack(tuple(layers), activation)
    raise ArchitectureError(f"{error}; give the layers' order if the names do not sort into it")


def stack_from_sequential(model: nn.Sequential) -> LinearStack:
    """The Linear stack of ``model``: Linear layers with one kind of activation (ReLU, GELU, SiLU) between each
    pair; Dropout, Identity and Flatten are skipped."""
    layers: list[LinearLayer] = []
    activations: set[str] = set()
    pending_act: str | None = None
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            if layers and pending_act is None:
                raise ArchitectureError(f"module {name!r} (Linear) follows a Linear layer with no activation between")
            layers.append(_layer(name, dict(module.named_parameters())))
            pending_act = None
        elif isinstance(module, (nn.ReLU, nn.GELU, nn.SiLU)):
            if not layers or pending_act is not None:
                raise ArchitectureError(f"module {name!r} ({type(module).__name__}): an activation must follow a "
                                        "Linear layer")
            pending_act = _activation_name(module)
            activations.add(pending_act)
        elif not isinstance(module, _SKIPPED_MODULES):
            raise ArchitectureError(f"module {name!r} ({type(module).__name__}): only Linear, ReLU, GELU, SiLU, "
                                    "Dropout, Identity and Flatten are supported (slonn returns the last Linear's "
                                    "logits: leave a final softmax out)")
    if pending_act is not None:
        raise ArchitectureError("the model ends in an activation; its last module must be the Linear head")
    if len(activations) > 1:
        raise ArchitectureError(f"the model mixes activations {sorted(activations)}; slonn serves one kind")
    if len(layers) < 2:
        raise ArchitectureError(f"found {len(layers)} Linear layer(s); an MLP has at least two")
    error = _chain_error(layers)
    if error:
        raise ArchitectureError(error)
    return LinearStack(tuple(layers), activations.pop())


def _activation_name(module: nn.Module) -> str:
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    return "silu" if isinstance(module, nn.SiLU) else "relu"
