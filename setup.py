"""Build hook: compile the scheduler's hot path with mypyc (``scheduler/compiled.py`` says which modules and
when the sources run instead). Everything else about the package is in pyproject.toml.

Optional: ``SLONN_COMPILED=0`` skips it, and without a C compiler (or on a type error) the package installs
as pure Python, with a message. mypy itself is a build requirement (pyproject.toml), fetched by pip.

mypyc runs only when extensions are built (``build_ext``), not on every setup.py call (metadata, egg_info).
The build record (``scheduler/compiled_sources.json``) is removed first and written only once every
extension exists, so a failed or partial rebuild never leaves old extensions marked current.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _compiled_module():
    spec = importlib.util.spec_from_file_location("_slonn_compiled", ROOT / "slonn" / "scheduler" / "compiled.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compiled = _compiled_module()


def mypyc_extensions() -> list:
    sources = [str(compiled.source_path(m, Path("."))) for m in compiled.COMPILED_MODULES]
    try:
        from mypyc.build import mypycify

        # Imports outside the compiled set (numpy, torch, ...) are typed Any: the build reads none of them
        # (type-checking against the installed torch took minutes).
        extensions = mypycify(
            ["--no-site-packages", "--ignore-missing-imports", "--follow-imports=silent", *sources],
            opt_level="3",
            group_name=compiled.SHARED_LIB.removesuffix("__mypyc"),  # the shared library, inside a package
        )
    except (Exception, SystemExit) as exc:  # mypy missing, or a type error (mypycify exits on those)
        print(f"slonn: not compiling the scheduler with mypyc ({exc!r}); the Python sources will run",
              file=sys.stderr)
        return []
    for ext in extensions:
        ext.optional = True  # no C compiler: install the sources rather than fail
    return extensions


class BuildCompiled(build_ext):
    """build_ext that runs mypyc itself and records the sources once every extension is built."""

    def finalize_options(self) -> None:
        if self.distribution.ext_modules:  # the placeholder: this build compiles
            self.distribution.ext_modules = mypyc_extensions()
        super().finalize_options()

    def run(self) -> None:
        out_dir = Path(self.get_ext_fullpath(compiled.SHARED_LIB)).parent
        for stale in {out_dir / compiled.STAMP.name, ROOT / compiled.STAMP}:
            stale.unlink(missing_ok=True)
        if not self.extensions:
            return
        super().run()
        built = [Path(self.get_ext_fullpath(ext.name)).exists() for ext in self.extensions]
        if all(built):
            out_dir.mkdir(parents=True, exist_ok=True)
            compiled.write_stamp(ROOT, out_dir)
        else:
            print(f"slonn: {built.count(False)} of {len(built)} compiled extensions failed to build; "
                  f"the Python sources will run", file=sys.stderr)


# One placeholder extension so that setuptools runs build_ext (and tags the wheel per platform); BuildCompiled
# replaces it with mypyc's. None at all with SLONN_COMPILED=0.
wanted = os.environ.get(compiled.ENV, "1") != "0"
if not wanted:  # extensions an earlier build left in the checkout must not pass for current ones
    (ROOT / compiled.STAMP).unlink(missing_ok=True)
setup(ext_modules=[Extension(compiled.SHARED_LIB, sources=[])] if wanted else [],
      cmdclass={"build_ext": BuildCompiled})
