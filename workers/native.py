"""The native fused sparse forward (``workers/csrc/sparse_forward.cpp``): built on first use, loaded with ctypes.

The source is compiled with the machine's C++ compiler (``$CXX``, else ``g++``/``c++``/``clang++``) with
``-O3 -march=native`` into a cache directory (``$SLONN_CACHE_DIR``, else ``$XDG_CACHE_HOME/slonn``, else
``~/.cache/slonn``), keyed by the source, the flags, the compiler's version and the CPU's feature flags, so
a library built for one CPU is never loaded on another. Workers starting together may both compile; each
writes its own temporary file and renames it into place. The build takes ~1.5 s once per machine.

Nothing here is required: without a compiler (or with ``SLONN_NATIVE=0``) :func:`library` returns None,
:func:`unavailable_reason` says why, and the kernels that need it are simply not offered (the chooser
measures and picks among the others). ctypes releases the GIL for the call, as torch's kernels do.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "sparse_forward.cpp"
ABI_VERSION = 2
"""``slonn_abi_version()`` of the source this module's signatures describe."""
FLAGS: tuple[str, ...] = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
ARCH_FLAGS: tuple[tuple[str, ...], ...] = (("-march=native",), ())
"""Tried in order: the machine's own vector units, else the compiler's default target."""
COMPILE_TIMEOUT_S = 180.0

_reason: str | None = None


def cache_dir() -> Path:
    if env := os.environ.get("SLONN_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "slonn"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(cxx: str) -> Path:
    """Path of the built library (compiled now unless the cache has it)."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    src = SOURCE.read_bytes()
    errors = []
    for arch in ARCH_FLAGS:
        key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS + arch).encode(), version.encode(),
                                         _cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:16]
        out = cache_dir() / f"sparse_forward-{key}.so"
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cxx, *FLAGS, *arch, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                                  timeout=COMPILE_TIMEOUT_S)
            if proc.returncode == 0:
                os.replace(tmp, out)
                log.info("built %s (%s %s)", out, cxx, " ".join(FLAGS + arch))
                return out
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        errors.append(f"{' '.join(arch) or 'default target'}: {proc.stderr.strip()[-500:]}")
    raise RuntimeError("compiling " + str(SOURCE) + " failed: " + " | ".join(errors))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library, or None when it cannot be had here (see :func:`unavailable_reason`)."""
    global _reason
    if os.environ.get("SLONN_NATIVE", "1") == "0":
        _reason = "disabled by SLONN_NATIVE=0"
        return None
    cxx = _compiler()
    if cxx is None:
        _reason = "no C++ compiler found ($CXX, g++, c++, clang++)"
        return None
    try:
        lib = ctypes.CDLL(str(_build(cxx)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _reason = f"{type(e).__name__}: {e}"
        log.warning("native sparse kernels unavailable: %s", _reason)
        return None
    if lib.slonn_abi_version() != ABI_VERSION:
        _reason = f"library ABI {lib.slonn_abi_version()} != {ABI_VERSION}"
        return None
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    lib.slonn_sparse_forward.restype = ctypes.c_int
    lib.slonn_sparse_forward.argtypes = [i64, ptr, i64, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, i32, ptr]
    return lib


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str | None:
    """Why :func:`library` is None (None when it is available or not tried yet)."""
    library()
    return _reason
