"""Dependencies point one way: policy and workers import neither each other nor the rest, scheduler builds on
both, only the ``slonn`` command's entry point imports scripts, and no modules of slonn import each other in a
circle. Read from the sources (every import statement, also those inside functions), not from an import."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "slonn"
PACKAGES = ("protos", "scheduler", "workers", "policy", "scripts")
BUILD_HOOK = "slonn.scheduler.compiled"
"""Standard library only; every package that holds compiled modules calls it in its ``__init__`` before they
load (scheduler/compiled.py), so policy may import it."""


def _module_files() -> dict[str, Path]:
    files = {f"slonn.{f.stem}": f for f in ROOT.glob("*.py") if f.stem != "__init__"}
    files["slonn"] = ROOT / "__init__.py"
    for package in PACKAGES:
        for f in (ROOT / package).glob("*.py"):
            files[f"slonn.{package}" if f.stem == "__init__" else f"slonn.{package}.{f.stem}"] = f
    return files


MODULES = _module_files()


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:``: imports there are for annotations only and
    never run."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imported(tree: ast.AST) -> set[str]:
    """Every module name an import statement in ``tree`` names (``from a import b``: ``a.b`` when that is a
    module of slonn, else ``a``)."""
    out: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{alias.name}" for alias in node.names} & set(MODULES)
            out |= subs or {node.module}
    return out


IMPORTS = {name: _imported(ast.parse(path.read_text(), str(path))) for name, path in MODULES.items()}
OURS = {name: {m for m in imported if m in MODULES} for name, imported in IMPORTS.items()}


def _in(package: str, module: str) -> bool:
    return module == f"slonn.{package}" or module.startswith(f"slonn.{package}.")


def _violations(package: str, allowed) -> list[str]:
    return sorted(f"{m} imports {dep}" for m, deps in OURS.items() if _in(package, m)
                  for dep in deps if not allowed(m, dep))


def test_the_walk_sees_the_packages_and_their_imports():
    for package in PACKAGES:
        assert f"slonn.{package}" in MODULES
    assert "slonn.policy.planner" in OURS["slonn.scheduler.core"]
    assert "slonn.workers.native" in OURS["slonn.workers.kernels"]  # `from slonn.workers import native`
    assert "numpy" in IMPORTS["slonn.policy.planner"] or "numpy" in IMPORTS["slonn.policy.latency_model"]


def test_no_modules_of_slonn_import_each_other_in_a_circle():
    try:
        graphlib.TopologicalSorter(OURS).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_policy_imports_only_itself_and_the_shared_leaves():
    shared = {"slonn.precision", BUILD_HOOK}
    assert _violations("policy", lambda m, dep: _in("policy", dep) or dep in shared) == []


def test_workers_import_only_themselves_and_the_shared_leaves():
    assert _violations("workers", lambda m, dep: _in("workers", dep) or dep == "slonn.precision") == []


def test_protos_import_only_themselves():
    assert _violations("protos", lambda m, dep: _in("protos", dep)) == []


def test_scheduler_does_not_import_scripts():
    assert _violations("scheduler", lambda m, dep: not _in("scripts", dep)) == []


def test_only_the_command_entry_point_imports_scripts():
    outside = sorted(f"{m} imports {dep}" for m, deps in OURS.items() if not _in("scripts", m)
                     for dep in deps if _in("scripts", dep))
    assert outside == ["slonn.__main__ imports slonn.scripts.cli"]


@pytest.mark.parametrize("module", ["slonn.precision", "slonn.policy.names", BUILD_HOOK])
def test_shared_leaf_modules_import_nothing_of_slonn(module):
    assert not {m for m in IMPORTS[module] if m == "slonn" or m.startswith("slonn.")}


@pytest.mark.parametrize(("package", "foreign"), [
    ("policy", {"torch", "grpc", "google"}),
    ("workers", {"grpc", "google"}),
])
def test_policy_and_workers_stay_off_the_transport_and_the_model_runtime(package, foreign):
    found = sorted(f"{m} imports {dep}" for m, deps in IMPORTS.items() if _in(package, m)
                   for dep in deps if dep.split(".")[0] in foreign)
    assert found == []


def test_request_errors_do_not_know_the_transport():
    assert not {m for m in IMPORTS["slonn.scheduler.errors"] if m.split(".")[0] in {"grpc", "google"}}
