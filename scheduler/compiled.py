"""The scheduling hot path compiled with mypyc, with its Python sources as the fallback.

``pip install -e .`` (``setup.py``) compiles :data:`COMPILED_MODULES` with mypyc into C extensions beside
their sources, and Python then imports the extension instead of the ``.py``. It is the same code: mypyc
compiles the sources as they are, so the server and the simulator still run one scheduler; the
simulator runs about 3x faster (docs/simulator.md). The build is optional: without mypy or a C compiler the
sources run.

The sources are imported instead of the extensions when

- ``SLONN_COMPILED=0`` is set in the environment, or
- a source changed since the build (its SHA-256 differs from the one the build recorded in
  :data:`STAMP`): the old extension would silently ignore the edit, so the sources load and a warning says
  to rebuild.

All or nothing: compiled modules call each other's native code directly, so they are never mixed with
interpreted ones. Every package that holds one calls :func:`install` in its ``__init__``, so the choice
is made before the first of them is imported. Standard library only: ``setup.py`` loads this file too.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Mapping

COMPILED_MODULES = ("slonn.policy.table", "slonn.policy.planner", "slonn.policy.baselines", "slonn.scheduler.clock",
                    "slonn.scheduler.queues", "slonn.scheduler.core", "slonn.scheduler.driver",
                    "slonn.scheduler.report", "slonn.scheduler.simloop", "slonn.scheduler.simulator")
"""What setup.py compiles: the per-request and per-batch path of the scheduler and of the driver around it, and
the simulator's event loop with the records it fills."""

TYPED_DEPENDENCIES = ("slonn.scheduler.config", "slonn.scheduler.errors", "slonn.scheduler.trace",
                      "slonn.policy.names")
"""Interpreted modules whose values flow into compiled attributes and arguments (class settings and their
modes, the exceptions raised and caught, the arrivals): mypyc builds their declared types in and checks them
at run time, so a change there also makes the build stale."""

SHARED_LIB = "slonn.scheduler.hotpath__mypyc"
"""The extension that holds all the compiled code (setup.py's mypyc group); the others are shims into it."""

ROOT = Path(__file__).absolute().parents[2]
"""The folder that holds the ``slonn`` package (the checkout, or site-packages). Not resolved: in a checkout
``slonn/scheduler`` links to the top-level ``scheduler/`` folder, and module paths go through ``slonn/``."""

STAMP = Path("slonn", "scheduler", "compiled_sources.json")
"""{module: SHA-256 of its source} as compiled, relative to the root; written by setup.py."""

ENV = "SLONN_COMPILED"

_state: dict | None = None


def source_path(module: str, root: Path = ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extension_built(module: str, root: Path = ROOT) -> bool:
    src = source_path(module, root)
    return any(src.with_name(src.stem + suffix).exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def sources_digests(root: Path = ROOT) -> dict[str, str]:
    """What the stamp records: the SHA-256 of every compiled module's source and of its typed dependencies."""
    return {m: source_digest(source_path(m, root)) for m in COMPILED_MODULES + TYPED_DEPENDENCIES}


def decide(root: Path = ROOT, environ: Mapping[str, str] = os.environ) -> dict:
    """Whether the extensions under ``root`` may load: {"compiled": bool, "reason": str}."""
    missing = [m for m in COMPILED_MODULES + (SHARED_LIB,) if not extension_built(m, root)]
    if set(COMPILED_MODULES) <= set(missing):
        return {"compiled": False, "reason": "not built (pip install -e . compiles it when mypy and a C compiler are there)"}
    if environ.get(ENV, "1") == "0":
        return {"compiled": False, "reason": f"{ENV}=0"}
    if missing:
        why = f"not built: {', '.join(missing)}"
    else:
        current = sources_digests(root)  # hashed once per process: this runs at every start-up
        try:
            recorded = json.loads((root / STAMP).read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded == current:
            return {"compiled": True, "reason": "mypyc extensions match their sources"}
        why = (f"no record of a finished build ({STAMP})" if recorded is None else
               "changed since the build: " + ", ".join(m for m, d in current.items() if recorded.get(m) != d))
    warnings.warn(f"slonn: running the scheduler's Python sources, not its compiled extensions ({why}); "
                  f"rebuild with `pip install -e .`", RuntimeWarning, stacklevel=4)
    return {"compiled": False, "reason": why}


class _SourcesFirst(importlib.abc.MetaPathFinder):
    """Imports the ``.py`` of a compiled module even though its extension sits beside it."""

    def find_spec(self, name, path=None, target=None):
        if name not in COMPILED_MODULES:
            return None
        return importlib.util.spec_from_file_location(name, source_path(name))


def install() -> dict:
    """Decide once per process whether the compiled modules load, and arrange it; returns :func:`state`."""
    global _state
    if _state is None:
        _state = decide()
        if not _state["compiled"] and any(extension_built(m) for m in COMPILED_MODULES):
            sys.meta_path.insert(0, _SourcesFirst())
    return _state


def state() -> dict:
    """{"compiled": bool, "reason": str}, plus which file each module was loaded from if it was."""
    out = dict(install())
    loaded = {m: getattr(sys.modules[m], "__file__", None) for m in COMPILED_MODULES if m in sys.modules}
    out["loaded"] = {m: Path(f).name if f else None for m, f in loaded.items()}
    return out


def write_stamp(root: Path, out_dir: Path | None = None) -> None:
    """Record the sources just compiled (setup.py, once every extension is built) in ``out_dir``
    (default: beside this file under ``root``)."""
    path = (out_dir / STAMP.name) if out_dir is not None else root / STAMP
    path.write_text(json.dumps(sources_digests(root), indent=1) + "\n")
