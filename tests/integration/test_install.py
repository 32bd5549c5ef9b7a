"""An installed slonn exposes one top-level import name, `slonn`, in a regular and in an editable install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]
PACKAGE_FOLDERS = ("protos", "scheduler", "workers", "policy", "scripts")


def _copy_checkout(dest: Path) -> Path:
    """The project's files without build products, trained models or run output."""
    ignore = shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "*.so", "models", "runs",
                                    ".pytest_cache", ".hypothesis", ".mypy_cache", "compiled_sources.json")
    shutil.copytree(CHECKOUT, dest, symlinks=True, ignore=ignore)
    return dest


def _venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin"


def _run(cmd: list, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    # No build of the compiled hot path (it needs mypy from the network) and no slonn from this process.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["SLONN_COMPILED"] = "0"
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert out.returncode == 0, f"{cmd}: {out.stdout}\n{out.stderr}"
    return out


def _check_one_name(bin_dir: Path, cwd: Path) -> None:
    py = bin_dir / "python"
    for name in PACKAGE_FOLDERS:
        out = _run([py, "-c", f"import {name}"], cwd, ok=False)
        assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, f"`import {name}` worked: {out}"
    _run([py, "-c", "import slonn.scheduler.compiled, slonn.scripts.cli"], cwd)
    # Package data through the package's own name (the packaged SLO classes), outside any checkout.
    out = _run([py, "-c", "from slonn.scheduler.config import load_classes; print(sorted(load_classes()))"], cwd)
    assert "interactive" in out.stdout
    help_out = _run([bin_dir / "slonn", "--help"], cwd)
    assert "serve" in help_out.stdout and "demo" in help_out.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX venv layout")
def test_a_wheel_installs_one_top_level_name(tmp_path):
    src = _copy_checkout(tmp_path / "src")
    bin_dir = _venv(tmp_path / "venv")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src],
         tmp_path)
    wheel = next((tmp_path / "dist").glob("slonn-*.whl"))
    _run([bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-index", wheel], tmp_path)
    site = next((tmp_path / "venv" / "lib").glob("python3*/site-packages"))
    ours = sorted(p.name for p in site.iterdir() if p.name.lower().startswith("slonn") or p.name in PACKAGE_FOLDERS)
    assert ours == ["slonn", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"]
    for folder in PACKAGE_FOLDERS:
        assert (site / "slonn" / folder / "__init__.py").is_file()
    _check_one_name(bin_dir, tmp_path)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX venv layout")
def test_an_editable_install_exposes_only_slonn(tmp_path):
    src = _copy_checkout(tmp_path / "src")
    bin_dir = _venv(tmp_path / "venv")
    # The editable wheel is built by this interpreter's setuptools (PEP 660), as pip would, offline.
    (tmp_path / "dist").mkdir()
    _run([sys.executable, "-c", f"import setuptools.build_meta as b; b.build_editable({str(tmp_path / 'dist')!r})"],
         src)
    wheel = next((tmp_path / "dist").glob("slonn-*.whl"))
    _run([bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-index", wheel], tmp_path)
    _check_one_name(bin_dir, tmp_path)
