"""`slonn train`: train a plain MLP on scikit-learn's digits, import it (calibrate, fine-tune SLO-aware) and
write the artifact: the demo model, made the way `slonn import` makes any model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slonn.workers.model import DEFAULT_HIDDEN, DEFAULT_LEVELS
from slonn.workers.train import TrainConfig, train_to


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(","))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slonn train", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("models/digits-mlp"), help="artifact directory")
    p.add_argument("--name", default="digits-mlp")
    p.add_argument("--hidden", default=",".join(map(str, DEFAULT_HIDDEN)), help="hidden widths, e.g. 4096,4096,4096")
    p.add_argument("--levels", type=_floats, default=DEFAULT_LEVELS, help="keep fractions, e.g. 1,0.5,0.1")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="plain training passes")
    p.add_argument("--finetune-epochs", type=int, default=TrainConfig.finetune_epochs,
                   help="SLO-aware fine-tuning passes at import (0: calibration only)")
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="plain training learning rate")
    p.add_argument("--finetune-lr", type=float, default=TrainConfig.finetune_lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    cfg = TrainConfig(name=args.name, hidden=tuple(int(w) for w in args.hidden.split(",")), levels=args.levels,
                      epochs=args.epochs, finetune_epochs=args.finetune_epochs, lr=args.lr,
                      finetune_lr=args.finetune_lr, seed=args.seed,
                      threads=args.threads)
    manifest = train_to(args.out, cfg)
    print(json.dumps({"artifact": str(args.out), "train_seconds": manifest.train_seconds,
                      "accuracy": {f"{k:g}": round(v, 4) for k, v in manifest.accuracy.items()}}, indent=2))
    return 0
