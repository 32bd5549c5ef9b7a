"""The mypyc-compiled hot path: when the extensions load, and that they compute what the sources compute."""

from __future__ import annotations

import importlib.machinery
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from slonn.policy.planner import Pending, Plan
from slonn.policy.table import LatencyTable
from slonn.scheduler import compiled

EXT = importlib.machinery.EXTENSION_SUFFIXES[0]


ALL_BUILT = compiled.COMPILED_MODULES + (compiled.SHARED_LIB,)


def tree(tmp_path: Path, built: tuple[str, ...] = ALL_BUILT, stamp: bool = True) -> Path:
    """A fake install: the sources of the compiled modules and their typed dependencies, an (empty)
    extension for each module in ``built``, and the build record."""
    for m in compiled.COMPILED_MODULES + compiled.TYPED_DEPENDENCIES + (compiled.SHARED_LIB,):
        src = compiled.source_path(m, tmp_path)
        src.parent.mkdir(parents=True, exist_ok=True)
        if m != compiled.SHARED_LIB:
            src.write_text(f"# {m}\n")
        if m in built:
            src.with_name(src.stem + EXT).write_bytes(b"")
    if stamp:
        compiled.write_stamp(tmp_path)
    return tmp_path


def test_extensions_load_when_they_match_their_sources(tmp_path):
    assert compiled.decide(tree(tmp_path), {})["compiled"]


def test_nothing_built_runs_the_sources(tmp_path):
    got = compiled.decide(tree(tmp_path, built=()), {})
    assert not got["compiled"] and "not built" in got["reason"]


def test_the_environment_can_turn_the_extensions_off(tmp_path):
    got = compiled.decide(tree(tmp_path), {"SLONN_COMPILED": "0"})
    assert not got["compiled"] and "SLONN_COMPILED=0" in got["reason"]


def test_an_edited_source_runs_from_source_with_a_warning(tmp_path):
    root = tree(tmp_path)
    compiled.source_path("slonn.scheduler.core", root).write_text("# edited after the build\n")
    with pytest.warns(RuntimeWarning, match="slonn.scheduler.core"):
        got = compiled.decide(root, {})
    assert not got["compiled"] and "changed since the build: slonn.scheduler.core" in got["reason"]


def test_an_edited_typed_dependency_makes_the_build_stale(tmp_path):
    root = tree(tmp_path)
    compiled.source_path("slonn.scheduler.config", root).write_text("# a field changed type\n")
    with pytest.warns(RuntimeWarning, match="slonn.scheduler.config"):
        assert not compiled.decide(root, {})["compiled"]


def test_a_partial_build_runs_every_module_from_source(tmp_path):
    with pytest.warns(RuntimeWarning, match="not built: slonn.scheduler.simulator"):
        got = compiled.decide(tree(tmp_path, built=ALL_BUILT[:-2] + ALL_BUILT[-1:]), {})
    assert not got["compiled"]


def test_shims_without_the_shared_library_run_the_sources(tmp_path):
    with pytest.warns(RuntimeWarning, match=compiled.SHARED_LIB):
        assert not compiled.decide(tree(tmp_path, built=compiled.COMPILED_MODULES), {})["compiled"]


def test_no_build_record_runs_the_sources(tmp_path):
    with pytest.warns(RuntimeWarning, match="no record of a finished build"):
        assert not compiled.decide(tree(tmp_path, stamp=False), {})["compiled"]


def test_the_stamp_records_every_compiled_source_and_typed_dependency(tmp_path):
    root = tree(tmp_path)
    recorded = json.loads((root / compiled.STAMP).read_text())
    assert set(recorded) == set(compiled.COMPILED_MODULES + compiled.TYPED_DEPENDENCIES)
    assert recorded["slonn.scheduler.core"] == compiled.source_digest(compiled.source_path("slonn.scheduler.core", root))


def test_this_process_loaded_what_state_says():
    import slonn.scheduler.core

    state = compiled.state()
    assert state["compiled"] == slonn.scheduler.core.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def _sources_only(code: str) -> str:
    env = dict(os.environ, SLONN_COMPILED="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=compiled.ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_slonn_compiled_0_imports_every_module_from_its_source():
    names = ", ".join(compiled.COMPILED_MODULES)
    files = _sources_only(f"import sys, {names}\nfor m in {compiled.COMPILED_MODULES!r}: print(sys.modules[m].__file__)")
    assert [Path(f).suffix for f in files.split()] == [".py"] * len(compiled.COMPILED_MODULES)


@pytest.mark.skipif(not compiled.state()["compiled"], reason="the mypyc extensions are not built here")
def test_the_compiled_simulator_answers_exactly_as_the_sources_do():
    """One simulated run, compiled here and from source in a child: every request's record is the same."""
    code = """
import json
import numpy as np
from slonn.scheduler.config import load_classes
from slonn.policy.factory import make_policy
from slonn.policy.table import LatencyTable
from slonn.scheduler.simulator import ContentionProfile, LatencyDraw, SimConfig, simulate
from slonn.scheduler.trace import poisson_arrivals

levels = (1.0, 0.5, 0.25, 0.1)
table = LatencyTable.constant(levels, 64, 0.4, 1.0)
classes = load_classes(None)
arrivals = poisson_arrivals(400.0, 4.0, {c: 1 for c in classes}, seed=3)
out = {}
for name in ("slonn", "triton", "fixed:0.25", "aimd"):
    draw = LatencyDraw({c: table.mean_ms[0] for c in (0.0, 0.6)},
                       {c: np.random.default_rng(1).lognormal(0, 0.3, 997) for c in (0.0, 0.6)})
    res = simulate(arrivals, classes, make_policy(name), table, (0.98, 0.97, 0.96, 0.9), draw,
                   SimConfig(ingress_ms_per_request=0.5), ContentionProfile(0.0, 0.6, 1.0, 2.5), seed=5)
    out[name] = [[r.status, r.answer_s, r.level, r.batch_size, r.correct, r.exec_ms, r.deadline_ms]
                 for r in res.records]
print(json.dumps(out))
"""
    here = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=compiled.ROOT)
    assert here.returncode == 0, here.stderr
    source_text = _sources_only(code)
    compiled_run, source_run = json.loads(here.stdout), json.loads(source_text)
    assert set(compiled_run) == {"slonn", "triton", "fixed:0.25", "aimd"}
    for name, records in compiled_run.items():
        assert len(records) > 1000
        assert {r[0] for r in records} >= {"OK"}
        assert records == source_run[name], name
    assert here.stdout == source_text  # formatted alike too (25.0 is not 25 in a CSV)


def test_a_table_pickles_through_its_constructor():
    table = LatencyTable.constant((1.0, 0.5), 8, 0.5, 1.0)
    back = pickle.loads(pickle.dumps(table))
    assert back.safe(0, 1, 5) == table.safe(0, 1, 5) and back.level_index(0.5) == 1
    assert back.fastest_index(0, (0.99, 0.98), 0.985) == 0


def test_records_pickle(tmp_path):
    """slonn reliability sends RequestRecords back from its client processes."""
    from slonn.scheduler.report import RequestRecord

    r = RequestRecord(3, "interactive", 25.0, 1.5, 1.52, "OK", 0.5, 4, True, False, 1.1, 1.3)
    back = pickle.loads(pickle.dumps(r))
    assert (back.index, back.status, back.latency_ms, back.correct) == (3, "OK", r.latency_ms, True)


def test_plans_compare_by_value_and_pending_shows_its_fields():
    a = Plan(3, 0.5, 2.0, reason="r", slack_ms=1.0, candidates=4)
    assert a == Plan(3, 0.5, 2.0, reason="r", slack_ms=1.0, candidates=4)
    assert a != Plan(3, 0.25, 2.0, reason="r", slack_ms=1.0, candidates=4)
    assert Plan(1, 1.0, 2.0) == Plan(1, 1.0, 2.0)  # slack_ms unset (NaN) on both
    assert Plan(1, 1.0, 2.0) != Plan(1, 1.0, 2.0, slack_ms=3.0)
    assert "level=0.5" in repr(a)
    assert "deadline_s=2.5" in repr(Pending(1, 2.0, 2.5, 0.9, 0, "latency", "reject"))
