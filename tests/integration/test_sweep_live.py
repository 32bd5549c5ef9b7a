"""`slonn sweep` against a real server: two low rates, both transports, every request answered."""

from __future__ import annotations

import json
import os

import pytest

from slonn.scripts.cli import main as cli_main

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc (Linux)")


def test_sweep_two_low_rates_on_both_transports(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert cli_main(["sweep", "--model-dir", str(tiny_model_dir), "--rates", "40,80", "--duration-s", "2",
                     "--warmup-s", "0.5", "--deadline-ms", "20000", "--json", str(out), "--log",
                     str(tmp_path / "serve.log"), "--", "--workers", "1"]) == 0
    table = capsys.readouterr().out
    got = json.loads(out.read_text())
    points = got["points"]
    assert [(p["transport"], p["rate_per_s"]) for p in points] == [
        ("unary", 40.0), ("unary", 80.0), ("stream", 40.0), ("stream", 80.0)]
    assert sum(p["sent"] for p in points) > 200
    for p in points:
        assert p["errors"] == {} and p["unanswered"] == 0  # every request answered OK
        assert p["served_accuracy"] > 0.5  # real answers to distinct inputs, checked against their labels
        assert p["server_cpu_ms"] > 0 and p["worker_cpu_ms"] > 0 and p["client_cpu_ms"] > 0
        assert p["saturated"] is False, p["saturation"]  # 20 s deadline, 80/s: nothing saturates
    assert got["max_sustained_per_s"] == {"unary": 80.0, "stream": 80.0}
    assert "max sustained rate/s: unary 80.0, stream 80.0" in table


def test_sweep_multi_sample_calls_count_samples_and_calls(tiny_model_dir, tmp_path):
    out = tmp_path / "sweep.json"
    assert cli_main(["sweep", "--model-dir", str(tiny_model_dir), "--rates", "160", "--duration-s", "2",
                     "--warmup-s", "0", "--deadline-ms", "20000", "--transports", "multi,multi-stream",
                     "--samples-per-call", "8", "--json", str(out), "--log", str(tmp_path / "serve.log"),
                     "--", "--workers", "1"]) == 0
    points = json.loads(out.read_text())["points"]
    assert [(p["transport"], p["samples_per_call"]) for p in points] == [("multi", 8), ("multi-stream", 8)]
    for p in points:
        assert p["sent"] % 8 == 0 and p["sent"] > 80  # one record per sample, whole calls of 8
        assert p["errors"] == {} and p["unanswered"] == 0
        assert p["served_accuracy"] > 0.5  # each sample's answer checked against its own label
        assert p["achieved_calls_per_s"] == pytest.approx(p["achieved_per_s"] / 8, abs=0.01)
        assert p["server_cpu_ms"] > 0 and p["server_cpu_ms_per_call"] == pytest.approx(8 * p["server_cpu_ms"],
                                                                                       abs=1e-3)
