"""A user's data set for import: features and labels from .npz, .csv or .parquet, with a held-out split.

- ``.npz``: arrays ``X`` and ``y``, optionally ``X_val`` and ``y_val`` (read without pickle: object arrays are
  refused).
- ``.csv``: a header row; the label column is named, every other column is a float feature.
- ``.parquet``: the same layout, read with pyarrow (the ``parquet`` extra).

Labels are integers (used as class indices) or strings (class names; index = position in the sorted names,
as scikit-learn's LabelEncoder orders them, unless the names are given). When no validation split is given,
a stratified one is held out with a recorded seed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_VAL_FRACTION = 0.2


@dataclass(frozen=True)
class Dataset:
    """Training and held-out rows, float32 features, int64 class indices."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    labels: tuple[str, ...] = ()
    """Class name per index (empty: integer labels, the index is the label)."""
    feature_names: tuple[str, ...] = ()
    describe: dict = field(default_factory=dict)
    """Source, sizes and how the held-out split was made (recorded in the manifest)."""

    @property
    def classes(self) -> int:
        return len(self.labels) or int(max(self.y_train.max(), self.y_val.max())) + 1


@dataclass(frozen=True)
class _Raw:
    x: np.ndarray
    y: np.ndarray
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    feature_names: tuple[str, ...] = ()


def load_dataset(path: Path, label: str = "label", label_names: tuple[str, ...] | None = None,
                 val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0) -> Dataset:
    """Read ``path`` (.npz, .csv or .parquet; ``label`` names the label column of a table)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        raw = _read_npz(path)
    elif suffix == ".csv":
        raw = _read_csv(path, label)
    elif suffix == ".parquet":
        raw = _read_parquet(path, label)
    else:
        raise ValueError(f"data file {path}: expected .npz, .csv or .parquet")
    return make_dataset(raw.x, raw.y, raw.x_val, raw.y_val, label_names=label_names, val_fraction=val_fraction,
                        seed=seed, feature_names=raw.feature_names, source=str(path))


def make_dataset(x: np.ndarray, y: np.ndarray, x_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
                 label_names: tuple[str, ...] | None = None, val_fraction: float = DEFAULT_VAL_FRACTION,
                 seed: int = 0, feature_names: tuple[str, ...] = (), source: str = "arrays") -> Dataset:
    """A Dataset from arrays: labels encoded, features checked, a held-out split made if none is given."""
    x = _features(x, "X")
    if (x_val is None) != (y_val is None):
        raise ValueError("X_val and y_val come together: give both or neither")
    if len(y) != len(x):
        raise ValueError(f"y has {len(y)} labels for {len(x)} rows of X")
    names, y_all = encode_labels(np.asarray(y) if y_val is None else np.concatenate([np.asarray(y), np.asarray(y_val)]),
                                 label_names)
    y_enc = y_all[:len(y)]
    split: dict = {"source": source}
    if x_val is None:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
        from sklearn.model_selection import train_test_split

        counts = np.bincount(y_enc)
        stratify = y_enc if counts[counts > 0].min() >= 2 else None
        x, x_v, y_enc, y_v = train_test_split(x, y_enc, test_size=val_fraction, random_state=seed, stratify=stratify)
        split |= {"validation": "held out", "val_fraction": val_fraction, "split_seed": seed,
                  "stratified": stratify is not None}
    else:
        x_v = _features(x_val, "X_val")
        y_v = y_all[len(y):]
        if len(y_v) != len(x_v):
            raise ValueError(f"y_val has {len(y_v)} labels for {len(x_v)} rows of X_val")
        if x_v.shape[1] != x.shape[1]:
            raise ValueError(f"X_val has {x_v.shape[1]} features, X has {x.shape[1]}")
        split |= {"validation": "given"}
    split |= {"train": int(len(x)), "test": int(len(x_v)), "features": int(x.shape[1])}
    if feature_names and len(feature_names) != x.shape[1]:
        raise ValueError(f"{len(feature_names)} feature names for {x.shape[1]} features")
    return Dataset(x, y_enc, x_v, y_v, names, tuple(feature_names), split)


def encode_labels(y: np.ndarray, label_names: tuple[str, ...] | None = None) -> tuple[tuple[str, ...], np.ndarray]:
    """(class names, int64 indices): integer labels stay as they are (no names) unless names are given;
    strings map to their position in ``label_names`` or in the sorted distinct names."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"labels have shape {list(y.shape)}; expected one label per row")
    if y.dtype.kind in "iu" and label_names is None:
        if y.min() < 0:
            raise ValueError(f"integer labels must be >= 0 (class indices); found {int(y.min())}")
        return (), y.astype(np.int64)
    if y.dtype.kind == "f":
        if not np.all(np.mod(y, 1) == 0):
            raise ValueError("labels are fractional numbers; expected integer class indices or class names")
        return encode_labels(y.astype(np.int64), label_names)
    text = y.astype(str)
    names = tuple(label_names) if label_names is not None else tuple(sorted(set(text.tolist())))
    index = {n: i for i, n in enumerate(names)}
    missing = sorted(set(text.tolist()) - set(index))
    if missing:
        raise ValueError(f"labels {missing[:5]} are not among the label names {list(names)[:20]}")
    return names, np.array([index[t] for t in text.tolist()], np.int64)


def _features(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} has shape {list(x.shape)}; expected rows x features")
    if x.dtype.kind not in "fiub":
        raise ValueError(f"{name} has dtype {x.dtype}; features must be numbers")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        r, c = bad[0]
        raise ValueError(f"{name}[{r}, {c}] is {x[r, c]}; features must be finite")
    return x


def _read_npz(path: Path) -> _Raw:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as exc:
        raise ValueError(f"data file {path}: {exc} (object arrays are not read; store labels as str or int)") from None
    for key in ("X", "y"):
        if key not in arrays:
            raise ValueError(f"data file {path}: array {key!r} missing; it has {sorted(arrays)} "
                             "(expected X, y and optionally X_val, y_val)")
    names = tuple(str(n) for n in arrays["feature_names"]) if "feature_names" in arrays else ()
    return _Raw(arrays["X"], arrays["y"], arrays.get("X_val"), arrays.get("y_val"), names)


def _read_csv(path: Path, label: str) -> _Raw:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise ValueError(f"data file {path}: empty (expected a header row)")
        if label not in header:
            raise ValueError(f"data file {path}: no label column {label!r}; columns: {header[:20]}")
        li = header.index(label)
        feature_names = tuple(h for i, h in enumerate(header) if i != li)
        labels, rows = [], []
        for n, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"data file {path}, line {n}: {len(row)} fields, the header has {len(header)}")
            labels.append(row[li])
            try:
                rows.append([float(v) for i, v in enumerate(row) if i != li])
            except ValueError:
                bad = next(i for i, v in enumerate(row) if i != li and not _is_float(v))
                raise ValueError(f"data file {path}, line {n}: column {header[bad]!r} = {row[bad]!r} is not a "
                                 "number") from None
    return _Raw(np.array(rows, np.float32).reshape(len(rows), len(feature_names)), _label_array(labels),
                feature_names=feature_names)


def _read_parquet(path: Path, label: str) -> _Raw:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"data file {path}: reading parquet needs pyarrow (pip install 'slonn[parquet]')") from None
    table = pq.read_table(path)
    if label not in table.column_names:
        raise ValueError(f"data file {path}: no label column {label!r}; columns: {table.column_names[:20]}")
    names = tuple(c for c in table.column_names if c != label)
    try:
        x = np.column_stack([table.column(c).to_numpy().astype(np.float32) for c in names])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"data file {path}: every column but {label!r} must be numeric ({exc})") from None
    return _Raw(x, np.asarray(table.column(label).to_pylist()), feature_names=names)


def _label_array(labels: list[str]) -> np.ndarray:
    """CSV labels: integers when every one parses as an integer, else strings."""
    try:
        return np.array([int(v) for v in labels], np.int64)
    except ValueError:
        return np.array(labels)


def _is_float(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False
