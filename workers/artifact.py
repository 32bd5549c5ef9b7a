"""Model artifacts: a directory with safetensors weights and a JSON manifest.

Loading never unpickles: weights come from safetensors, metadata from JSON.

    models/digits-mlp/
        weights.safetensors
        manifest.json   # architecture, levels, accuracy per level, seed, versions
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slonn.workers.model import MLPArchitecture, SLOAwareMLP

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class ModelManifest:
    """What a served model is: its shape, its levels and how accurate each level is."""

    name: str
    """Model name clients put in InferRequest.model."""
    arch: MLPArchitecture
    """Layer widths."""
    levels: tuple[float, ...]
    """Keep fractions the model was trained for, most accurate first."""
    accuracy: dict[float, float]
    """Held-out accuracy per level, measured when the artifact was written."""
    seed: int = 0
    """Training seed."""
    dataset: dict = field(default_factory=dict)
    """Where the data came from and the split sizes."""
    versions: dict = field(default_factory=dict)
    """Library versions used for training."""
    train_seconds: float = 0.0
    """Wall time of training."""

    def to_json(self) -> dict:
        d = asdict(self)
        d["format_version"] = FORMAT_VERSION
        d["arch"]["hidden"] = list(self.arch.hidden)
        # float(): numpy scalars would write "np.float64(0.5)" keys (numpy 2 repr) that from_json cannot read.
        d["levels"] = [float(x) for x in self.levels]
        d["accuracy"] = {repr(float(k)): float(v) for k, v in self.accuracy.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelManifest":
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"manifest format_version={d.get('format_version')!r}, expected {FORMAT_VERSION}")
        arch = d["arch"]
        return cls(
            name=d["name"],
            arch=MLPArchitecture(arch["in_features"], tuple(arch["hidden"]), arch["out_features"]),
            levels=tuple(float(x) for x in d["levels"]),
            accuracy={float(k): float(v) for k, v in d["accuracy"].items()},
            seed=int(d.get("seed", 0)),
            dataset=d.get("dataset", {}),
            versions=d.get("versions", {}),
            train_seconds=float(d.get("train_seconds", 0.0)),
        )


def save_artifact(model: SLOAwareMLP, manifest: ModelManifest, directory: Path) -> Path:
    """Write weights and manifest into ``directory`` (created if needed); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    # Manifest last: its presence marks a complete artifact.
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return directory


def load_manifest(directory: Path) -> ModelManifest:
    path = Path(directory) / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"no model artifact at {directory}: {MANIFEST_FILE} missing (run `slonn train`)")
    return ModelManifest.from_json(json.loads(path.read_text()))


def load_artifact(directory: Path, device: str | torch.device = "cpu") -> tuple[SLOAwareMLP, ModelManifest]:
    """Load a model for inference (eval mode, on ``device``) and its manifest."""
    manifest = load_manifest(directory)
    model = SLOAwareMLP(manifest.arch)
    state = load_file(str(Path(directory) / WEIGHTS_FILE), device="cpu")
    model.load_state_dict(state)
    return model.to(device).eval(), manifest


def is_artifact(directory: Path) -> bool:
    return (Path(directory) / MANIFEST_FILE).exists() and (Path(directory) / WEIGHTS_FILE).exists()
