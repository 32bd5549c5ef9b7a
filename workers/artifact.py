"""Model artifacts: a directory with safetensors weights and a JSON manifest.

Loading never unpickles: weights come from safetensors, metadata from JSON.

    models/digits-mlp/
        weights.safetensors
        manifest.json   # architecture, levels, accuracy per level, input contract, labels, seed, versions
        heldout.safetensors   # optional: held-out inputs and labels (benchmarks and profiles of any model)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from slonn.workers.contract import InputContract
from slonn.workers.model import MLPArchitecture, SLOAwareMLP

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
HELDOUT_FILE = "heldout.safetensors"
MAX_HELDOUT_ROWS = 4096
"""Held-out rows kept in an artifact: enough for the benchmarks' accuracy, small beside the weights."""


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
    """Wall time of training (or of import: calibration plus fine-tuning)."""
    input: InputContract | None = None
    """What clients send (None in artifacts written before the contract was recorded)."""
    labels: tuple[str, ...] = ()
    """Class name per output index (empty: the indices are the labels)."""
    calibration: dict = field(default_factory=dict)
    """Imported models: the original's accuracy, the accuracy per level as imported (no training) and after
    fine-tuning, and the time each step took."""

    def to_json(self) -> dict:
        d = asdict(self)
        d["format_version"] = FORMAT_VERSION
        d["arch"]["hidden"] = list(self.arch.hidden)
        # float(): numpy scalars would write "np.float64(0.5)" keys (numpy 2 repr) that from_json cannot read.
        d["levels"] = [float(x) for x in self.levels]
        d["accuracy"] = {repr(float(k)): float(v) for k, v in self.accuracy.items()}
        d["input"] = None if self.input is None else self.input.to_json()
        d["labels"] = list(self.labels)
        return d

    @property
    def contract(self) -> InputContract:
        """The input contract. Artifacts written without one came from the digits trainer: raw pixels 0..16,
        standardised by the model."""
        if self.input is not None:
            return self.input
        n = self.arch.in_features
        return InputContract(n, (0.0,) * n, (16.0,) * n, "standardize")

    @classmethod
    def from_json(cls, d: dict) -> "ModelManifest":
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"manifest format_version={d.get('format_version')!r}, expected {FORMAT_VERSION}")
        arch = d["arch"]
        return cls(
            name=d["name"],
            arch=MLPArchitecture(arch["in_features"], tuple(arch["hidden"]), arch["out_features"],
                                 arch.get("activation", "relu")),
            levels=tuple(float(x) for x in d["levels"]),
            accuracy={float(k): float(v) for k, v in d["accuracy"].items()},
            seed=int(d.get("seed", 0)),
            dataset=d.get("dataset", {}),
            versions=d.get("versions", {}),
            train_seconds=float(d.get("train_seconds", 0.0)),
            input=InputContract.from_json(d["input"]) if d.get("input") else None,
            labels=tuple(d.get("labels", ())),
            calibration=d.get("calibration", {}),
        )


def save_artifact(model: SLOAwareMLP, manifest: ModelManifest, directory: Path,
                  heldout: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """Write weights, the held-out rows if given, and the manifest into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    if heldout is not None:
        save_heldout(directory, *heldout, seed=manifest.seed)
    # Manifest last: its presence marks a complete artifact.
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return directory


def save_heldout(directory: Path, x: np.ndarray, y: np.ndarray, seed: int = 0) -> None:
    """Keep up to MAX_HELDOUT_ROWS held-out rows (a seeded sample) beside the weights."""
    if len(x) > MAX_HELDOUT_ROWS:
        idx = np.sort(np.random.default_rng(seed).choice(len(x), MAX_HELDOUT_ROWS, replace=False))
        x, y = x[idx], y[idx]
    save_file({"x": torch.from_numpy(np.ascontiguousarray(x, np.float32)),
               "y": torch.from_numpy(np.ascontiguousarray(y, np.int64))}, str(Path(directory) / HELDOUT_FILE))


def load_heldout(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """Held-out inputs and labels of the artifact; older artifacts without them are digits models."""
    path = Path(directory) / HELDOUT_FILE
    if not path.exists():
        from slonn.workers.digits import load_split

        split = load_split()
        return split.x_test, split.y_test
    t = load_file(str(path))
    return t["x"].numpy(), t["y"].numpy()


def load_labelled_rows(path: Path, label: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """Rows to send to a model, with their labels: an artifact directory's held-out rows, or a data file's
    held-out rows (.npz, .csv or .parquet, read as ``slonn import`` reads it; ``label`` names a table's
    label column)."""
    path = Path(path)
    if path.is_dir():
        if not (path / MANIFEST_FILE).exists():
            raise FileNotFoundError(f"{path} is a directory but not a model artifact ({MANIFEST_FILE} missing)")
        return load_heldout(path)
    from slonn.workers.data import load_dataset

    data = load_dataset(path, label=label)
    return data.x_val, data.y_val


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
