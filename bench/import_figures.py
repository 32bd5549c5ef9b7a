"""Import figures: a plain MLP trained with ordinary PyTorch, imported into slonn, measured. Prints JSON.

    python -m bench.import_figures digits      # 8x8 digits, 64-1024-1024-10 ReLU
    python -m bench.import_figures tabular     # make_classification 100k x 512, 20 classes, 512-2048-2048-20 ReLU
    python -m bench.import_figures embedding   # synthetic 768-d embeddings, 768-1024-1024-16 GELU

Each case: train the plain network (a loop written here, not slonn's trainer), save its state dict as
safetensors and the data as .npz, import them as ``slonn import`` does (calibration, then SLO-aware
fine-tuning), then run ``slonn bench-kernels`` on the artifact at batch 1/16/64. The JSON gives held-out
accuracy per level of the original, as imported, and after fine-tuning; the import's times; and the kernels'
speedup over the plain dense model per level and batch size.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from slonn.scripts import bench_kernels
from slonn.workers.calibrate import first_level_within
from slonn.workers.data import load_dataset, make_dataset
from slonn.workers.finetune import FinetuneConfig
from slonn.workers.importer import ImportConfig, import_to
from slonn.workers.layers import read_state_file, stack_from_state_dict

CASES = {
    # name: (hidden, activation, preprocessing, plain epochs, fine-tune epochs, rows)
    # The fine-tuning learning rate is slonn import's default for the rows (1e-4 for the digits, 1e-3 for the
    # synthetic sets).
    "digits": ((1024, 1024), "relu", "scale", 30, 15, 0),
    "tabular": ((2048, 2048), "relu", "standardize", 4, 3, 100_000),
    "embedding": ((1024, 1024), "gelu", "none", 10, 6, 30_000),
}
TARGET_POINTS = 0.5
"""The target: fine-tuned accuracy at keep 0.1 within this many points of the original's."""


def make_data(case: str, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The case's features and labels (float32, int64)."""
    if case == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.data.astype(np.float32), d.target.astype(np.int64)
    from sklearn.datasets import make_classification

    if case == "tabular":
        x, y = make_classification(n_samples=rows, n_features=512, n_informative=96, n_redundant=32,
                                   n_classes=20, n_clusters_per_class=2, class_sep=1.5, random_state=seed)
        return x.astype(np.float32), y.astype(np.int64)
    # Embeddings: class structure in a 64-d latent space, projected to 768-d with isotropic noise and
    # normalised to unit length, as sentence-embedding models emit.
    z, y = make_classification(n_samples=rows, n_features=64, n_informative=48, n_redundant=0, n_classes=16,
                               n_clusters_per_class=2, class_sep=1.5, random_state=seed)
    rng = np.random.default_rng(seed)
    proj = np.linalg.qr(rng.normal(size=(768, 64)))[0].T
    x = z @ proj + rng.normal(scale=0.05, size=(rows, 768))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y.astype(np.int64)


def train_plain(x: np.ndarray, y: np.ndarray, hidden: tuple[int, ...], activation: str, classes: int,
                epochs: int, seed: int) -> nn.Sequential:
    """What a user would have: a plain nn.Sequential trained with Adam and cross-entropy."""
    torch.manual_seed(seed)
    act = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}[activation]
    widths = (x.shape[1], *hidden)
    mods: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        mods += [nn.Linear(a, b), act()]
    net = nn.Sequential(*mods, nn.Linear(widths[-1], classes))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    batch = 64 if len(x) < 10_000 else 256
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * ((len(x) + batch - 1) // batch))
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch):
            loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def run(args: argparse.Namespace, seed: int, kernels_too: bool = True) -> dict:
    """One seed's figures (the data, the plain network's initialisation, the split and the fine-tuning)."""
    hidden, activation, preprocessing, epochs, ft_epochs, rows = CASES[args.case]
    epochs = args.epochs or epochs
    ft_epochs = args.finetune_epochs if args.finetune_epochs is not None else ft_epochs
    rows = args.rows or rows
    torch.set_num_threads(args.threads)
    out = Path(args.out or f"models/figures-{args.case}")
    out = out if seed == args.seeds[0] else out.with_name(f"{out.name}-seed{seed}")
    out.mkdir(parents=True, exist_ok=True)
    x, y = make_data(args.case, rows, seed)
    split = make_dataset(x, y, seed=seed)
    # The user's own preprocessing, done the way they would (the import recomputes it from the same rows).
    from slonn.workers.contract import InputContract

    shift, scale = InputContract.from_data(split.x_train, preprocessing).shift_scale(split.x_train)
    weights, data = out.parent / f"{out.name}.safetensors", out.parent / f"{out.name}.npz"
    plain_s = None
    if not (args.reuse_plain and weights.exists() and data.exists()):
        t0 = time.perf_counter()
        net = train_plain((split.x_train - shift) / scale, split.y_train, hidden, activation, split.classes, epochs,
                          seed)
        plain_s = round(time.perf_counter() - t0, 1)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
        np.savez(data, X=split.x_train, y=split.y_train, X_val=split.x_val, y_val=split.y_val)
    t0 = time.perf_counter()
    stack = stack_from_state_dict(read_state_file(weights), activation)
    batch = 256 if rows else 64
    finetune = (FinetuneConfig(epochs=ft_epochs, batch_size=batch, lr=args.finetune_lr, seed=seed)
                if ft_epochs else None)
    manifest = import_to(out, stack, load_dataset(data), ImportConfig(
        name=f"figures-{args.case}", preprocessing=preprocessing, finetune=finetune, seed=seed))
    import_s = time.perf_counter() - t0
    cal = manifest.calibration
    kernels = bench_kernels.run(bench_kernels._parse(
        ["--model-dir", str(out), "--batch-sizes", "1,16,64", "--repeats", str(args.repeats),
         "--threads", str(args.threads)])) if kernels_too else {"rows": [], "precision": None}
    ft_lr = cal.get("finetune", {}).get("lr")
    original = cal["original_accuracy"]
    as_is = {float(k): v for k, v in cal["as_imported"].items()}
    tuned = {float(k): v for k, v in cal.get("finetuned", {}).items()}
    return {
        "case": args.case,
        "seed": seed,
        "machine": {"platform": platform.platform(), "cpu_count": torch.multiprocessing.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__},
        "data": {"rows": int(len(x)), "features": int(x.shape[1]), "classes": split.classes,
                 "train": int(len(split.x_train)), "held_out": int(len(split.x_val))},
        "model": {"hidden": list(hidden), "activation": activation, "preprocessing": preprocessing,
                  "plain_epochs": epochs, "finetune_epochs": ft_epochs, "finetune_lr": ft_lr},
        "command": f"slonn import {weights} --data {data} --activation {activation} --preprocessing "
                   f"{preprocessing} --finetune-epochs {ft_epochs} --batch-size {batch} --seed {seed}"
                   + (f" --lr {args.finetune_lr}" if args.finetune_lr else "") + f" --out {out}",
        "served": cal.get("served", "as_imported"),
        "seconds": {"plain_training": plain_s, "import_total": round(import_s, 1),
                    "calibration": cal["calibrate_seconds"], "finetune": cal.get("finetune_seconds", 0.0)},
        "accuracy": [{"level": lv, "original": round(original, 4), "as_imported": round(as_is[lv], 4),
                      "finetuned": round(tuned[lv], 4) if tuned else None} for lv in sorted(as_is, reverse=True)],
        "target": {"points": TARGET_POINTS,
                   "finetuned_at_0.1_minus_original_points": round(100 * (tuned[0.1] - original), 2) if tuned else None,
                   "lowest_level_within_target_as_imported": first_level_within(as_is, original, TARGET_POINTS / 100),
                   "lowest_level_within_target_finetuned": first_level_within(tuned, original, TARGET_POINTS / 100)
                   if tuned else None},
        "kernels": [{"batch": r["batch"], "level": r["level"], "dense_ms": r["dense_ms"],
                     "chosen_kernel": r["chosen_kernel"], "chosen_ms": r["chosen_ms"], "speedup": r["speedup"]}
                    for r in kernels["rows"]],
        "kernel_precision": kernels["precision"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.import_figures", description=__doc__.splitlines()[0])
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("--out", default=None, help="artifact directory (default models/figures-CASE)")
    p.add_argument("--rows", type=int, default=0, help="rows of the synthetic cases (0: the case's default)")
    p.add_argument("--epochs", type=int, default=0, help="plain training passes (0: the case's default)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning passes (default: the case's)")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="fine-tuning learning rate (default: slonn import's for the rows)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10, help="timed calls per kernel cell")
    p.add_argument("--seeds", type=lambda v: [int(s) for s in v.split(",")], default=[0],
                   help="seeds, e.g. 0,1,2,3,4: each draws its own data (synthetic cases), split, plain network and "
                        "fine-tuning; the kernels are timed on the first only, and a summary gives the spread "
                        "at keep 0.1")
    p.add_argument("--reuse-plain", action="store_true",
                   help="import the plain network and data saved next to --out by an earlier run of the same case "
                        "and seed instead of training it again (plain_training is then null)")
    args = p.parse_args(argv)
    runs = [run(args, seed, kernels_too=i == 0) for i, seed in enumerate(args.seeds)]
    if len(runs) == 1:
        print(json.dumps(runs[0], indent=2))
        return 0
    gaps = [r["target"]["finetuned_at_0.1_minus_original_points"] for r in runs]
    summary = {"seeds": args.seeds, "finetuned_at_0.1_minus_original_points": gaps}
    if None not in gaps:
        summary |= {"mean": round(float(np.mean(gaps)), 2), "min": min(gaps), "max": max(gaps),
                    "within_target": sum(g >= -TARGET_POINTS for g in gaps)}
    print(json.dumps({"summary": summary, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
