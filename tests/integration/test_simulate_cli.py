"""`slonn simulate` end to end on a small real model and a synthetic profile, in whichever mode this
install runs (compiled or sources: the CLI must work in both)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest

from slonn.scheduler import compiled
from slonn.scheduler.compiled import state
from bench import bench_sim
from slonn.scripts import simulate


CLASSES = """
[[class]]
name = "interactive"
latency_ms = 25
min_accuracy = 0.5

[[class]]
name = "standard"
latency_ms = 100
min_accuracy = 0.5

[[class]]
name = "batch"
latency_ms = 500
min_accuracy = 0.999
"""


CLASS_NAMES = ("interactive", "standard", "batch")


def write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """The classes above and a synthetic profile of a known shape (level x batch x contention, noisy)."""
    classes = tmp_path / "classes.toml"
    classes.write_text(CLASSES)
    profile = tmp_path / "profile.csv"
    rng = np.random.default_rng(0)
    with open(profile, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["level", "batch_size", "contention", "exec_ms"])
        for level in (1.0, 0.5, 0.25, 0.1):
            for b in (1, 2, 4, 8, 16, 32, 64):
                for c in (0.0, 0.5, 1.0):
                    for _ in range(3):
                        w.writerow([level, b, c, (0.5 + 0.05 * b * level) * (1 + c) * rng.lognormal(0, 0.1)])
    return classes, profile


def test_simulate_cli_prints_a_summary_and_says_whether_it_ran_compiled(tiny_model_dir, tmp_path, capsys):
    classes, profile = write_inputs(tmp_path)
    assert simulate.main(["--model-dir", str(tiny_model_dir), "--profile", str(profile), "--classes", str(classes),
                          "--duration-s", "300", "--speedup", "10", "--corunner-start-s", "10",
                          "--corunner-stop-s", "20", "--csv", str(tmp_path / "records.csv"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sim"]["compiled"] == state()["compiled"]
    summary = out["summary"]
    assert out["sim"]["requests"] == summary["all"]["sent"] == sum(summary[c]["sent"] for c in CLASS_NAMES) > 0
    assert summary["interactive"]["answered_ok"] > 0
    # A class whose floor is above the model's best level is refused at admission, as the live server does.
    assert summary["batch"]["errors"] == {"FAILED_PRECONDITION": summary["batch"]["sent"]}
    assert set(out["phases"]) == {"before", "during", "after"}
    with open(tmp_path / "records.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == out["sim"]["requests"]
    assert {r["status"] for r in rows if r["slo_class"] == "batch"} == {"FAILED_PRECONDITION"}


def test_bench_sim_side_by_side_runs_both_checkouts_and_reports_each_pair(tiny_model_dir, tmp_path, capsys):
    """``--against``: two pinned children at once, one per checkout (here the same one twice; each child's
    code root and build are checked, so a finished run means both ran this checkout compiled)."""
    if len(os.sched_getaffinity(0)) < 2 or shutil.which("taskset") is None:
        pytest.skip("side by side needs two CPUs and taskset")
    if not compiled.decide(environ={})["compiled"]:  # the children run compiled whatever SLONN_COMPILED says here
        pytest.skip("side by side compares compiled builds; the mypyc extensions are not built here")
    classes, profile = write_inputs(tmp_path)
    argv = ["--policy", "fixed:0.1", "--against", ".", "--rounds", "2", "--reps", "2", "--model-dir",
            str(tiny_model_dir), "--profile", str(profile), "--classes", str(classes), "--duration-s", "120",
            "--speedup", "10"]
    assert bench_sim.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["roots_checked"] == {"this": True, "other": True}
    assert len(out["ratios"]) == len(out["this_medians"]) == len(out["other_medians"]) == 2
    assert all(m > 0 for m in out["this_medians"] + out["other_medians"])
    assert out["median_ratio"] == pytest.approx(statistics.median(out["ratios"]))


def test_compare_sim_writes_one_table_with_every_policy_and_says_whether_it_ran_compiled(tiny_model_dir, tmp_path):
    from slonn.scripts import compare

    classes, profile = write_inputs(tmp_path)
    out_dir = tmp_path / "cmp"
    assert compare.main(["--sim", "--policies", "slonn,triton,fixed:0.1", "--corunner", "--model-dir",
                         str(tiny_model_dir), "--profile", str(profile), "--classes", str(classes),
                         "--duration-s", "120", "--speedup", "5", "--out", str(out_dir)]) == 0
    report = json.loads((out_dir / "compare.json").read_text())
    assert report["modes"] == ["sim"] and report["sim"]["compiled"] == state()["compiled"]
    assert {r["policy"] for r in report["rows"]} == {"slonn", "triton", "fixed:0.1"}
    assert set(report["sim"]["simulated_requests_per_s"]) == {"slonn", "triton", "fixed:0.1"}
    for name in ("slonn", "triton", "fixed_0.1"):
        with open(out_dir / f"sim-{name}.csv", newline="") as f:
            assert sum(1 for _ in csv.DictReader(f)) == report["load"]["requests"]
    assert "slonn" in (out_dir / "compare.md").read_text()
