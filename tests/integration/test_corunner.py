"""The co-runner reports the CPU it got, so a replay can show it really took its core."""

from __future__ import annotations

import sys
import time

import pytest

from scripts.corunner import CpuBurner


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_burner_reports_the_cpu_it_got():
    burner = CpuBurner(n_procs=1)
    assert burner.usage() is None  # nothing ran yet
    burner.start()
    time.sleep(0.5)
    burner.stop()
    usage = burner.usage()
    assert usage is not None and usage["asked_cores"] == 1.0
    assert usage["cpu_s"] > 0 and usage["wall_s"] >= 0.5 and usage["cores"] == pytest.approx(
        usage["cpu_s"] / usage["wall_s"], abs=1e-2)
