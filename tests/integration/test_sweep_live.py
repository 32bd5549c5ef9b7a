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
