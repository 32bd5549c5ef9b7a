"""`slonn import`: make a trained PyTorch MLP SLO-aware and write a slonn artifact.

    slonn import model.safetensors --data data.npz --name my-mlp --preprocessing standardize

The weights are a state dict of Linear layers (safetensors, or a .pt/.pth file read with
``torch.load(weights_only=True)``); the architecture is read from their shapes and order. The data is the one
the model was trained on (.npz with X, y[, X_val, y_val]; .csv or .parquet with a label column): the
preprocessing the model expects is computed from its training rows and applied by the server, every level's
accuracy is measured on the held-out rows as imported, then again after SLO-aware fine-tuning (unless
``--finetune-epochs 0``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from slonn.workers.contract import PREPROCESSING
from slonn.workers.data import DEFAULT_VAL_FRACTION, load_dataset
from slonn.workers.finetune import LARGE_DATA_ROWS, FinetuneConfig
from slonn.workers.importer import ImportConfig, import_to
from slonn.workers.layers import ArchitectureError, read_state_file, stack_from_state_dict
from slonn.workers.model import ACTIVATIONS, DEFAULT_LEVELS


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(","))


def _names(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="slonn import", description=__doc__.splitlines()[0])
    p.add_argument("weights", type=Path, help="state dict: .safetensors, or .pt/.pth (weights_only)")
    p.add_argument("--data", type=Path, required=True, help=".npz (X, y[, X_val, y_val]), .csv or .parquet")
    p.add_argument("--label", default="label", help="label column of a .csv/.parquet file")
    p.add_argument("--label-names", type=_names, default=None,
                   help="class names in output order, e.g. cat,dog (default: integer labels as indices, string "
                        "labels sorted)")
    p.add_argument("--activation", choices=ACTIVATIONS, default="relu", help="the model's hidden activation")
    p.add_argument("--layers", type=_names, default=None,
                   help="the Linear layers' names in order, when the names do not sort into it (e.g. fc1,fc2,out)")
    p.add_argument("--preprocessing", choices=PREPROCESSING, default="none",
                   help="what the model was trained on: standardize ((x-mean)/std), scale ((x-min)/(max-min)) of "
                        "the training rows, or none (raw features); the server applies it")
    p.add_argument("--name", default=None, help="model name (default: the weights file's stem)")
    p.add_argument("--out", type=Path, default=None, help="artifact directory (default: models/NAME)")
    p.add_argument("--levels", type=_floats, default=DEFAULT_LEVELS, help="candidate keep fractions")
    p.add_argument("--finetune-epochs", type=int, default=FinetuneConfig.epochs,
                   help="SLO-aware fine-tuning passes (0: calibration only)")
    p.add_argument("--batch-size", type=int, default=FinetuneConfig.batch_size)
    p.add_argument("--lr", type=float, default=None,
                   help=f"fine-tuning learning rate (default: 1e-4, or 1e-3 from {LARGE_DATA_ROWS:,} rows up)")
    p.add_argument("--temperature", type=float, default=FinetuneConfig.temperature,
                   help="distillation temperature: below 1 sharpens the original's outputs")
    p.add_argument("--focus-level", type=float, default=FinetuneConfig.focus_level,
                   help="a level trained in every fine-tuning step, when it is one of --levels (0: none)")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="held out when the data has no validation split")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the fine-tuning")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", action="store_true", help="print only the JSON summary")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = args.name or args.weights.stem
    out = args.out or Path("models") / name
    start = time.perf_counter()
    try:
        stack = stack_from_state_dict(read_state_file(args.weights), args.activation, args.layers)
        data = load_dataset(args.data, args.label, args.label_names, args.val_fraction, args.seed)
        finetune = (FinetuneConfig(epochs=args.finetune_epochs, batch_size=args.batch_size, lr=args.lr,
                                   temperature=args.temperature, focus_level=args.focus_level, seed=args.seed)
                    if args.finetune_epochs > 0 else None)
        cfg = ImportConfig(name=name, levels=args.levels, preprocessing=args.preprocessing, finetune=finetune,
                           seed=args.seed, threads=args.threads)
        manifest = import_to(out, stack, data, cfg)
    except (ArchitectureError, ValueError, FileNotFoundError) as exc:
        print(f"slonn import: {exc}", file=sys.stderr)
        return 2
    cal = manifest.calibration
    print(json.dumps({
        "artifact": str(out), "name": name, "in_features": manifest.arch.in_features,
        "hidden": list(manifest.arch.hidden), "out_features": manifest.arch.out_features,
        "activation": manifest.arch.activation, "labels": list(manifest.labels),
        "original_accuracy": round(cal["original_accuracy"], 4),
        "as_imported": cal["as_imported"], "finetuned": cal.get("finetuned"),
        "calibrate_seconds": cal["calibrate_seconds"], "finetune_seconds": cal.get("finetune_seconds", 0.0),
        "import_seconds": round(time.perf_counter() - start, 2)}, indent=2))
    return 0
