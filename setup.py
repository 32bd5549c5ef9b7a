"""Build hook: compile the scheduler's hot path with mypyc (``scheduler/compiled.py`` says which modules and
when the sources run instead). Everything else about the package is in pyproject.toml.

Optional: ``SLONN_COMPILED=0`` skips it, and without mypy or a C compiler the package installs as pure
Python (a warning says so).
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def compiled_extensions() -> list:
    if os.environ.get("SLONN_COMPILED", "1") == "0":
        return []
    spec = importlib.util.spec_from_file_location("_slonn_compiled", ROOT / "scheduler" / "compiled.py")
    compiled = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compiled)
    sources = [str(compiled.source_path(m, Path("."))) for m in compiled.COMPILED_MODULES]
    try:
        from mypyc.build import mypycify

        # Imports outside the compiled set (numpy, torch, ...) are typed Any: the build reads none of them
        # (type-checking against the installed torch took minutes).
        extensions = mypycify(
            ["--no-site-packages", "--ignore-missing-imports", "--follow-imports=silent", *sources],
            opt_level="3",
            group_name="scheduler.hotpath",  # the shared library, inside a package: scheduler/hotpath__mypyc.*.so
        )
    except BaseException as exc:  # mypy missing, or a type error (mypycify exits on those)
        print(f"slonn: not compiling the scheduler with mypyc ({exc!r}); the Python sources will run",
              file=sys.stderr)
        return []
    compiled.write_stamp(ROOT)
    for ext in extensions:
        ext.optional = True  # no C compiler: install the sources rather than fail
    return extensions


setup(ext_modules=compiled_extensions())
