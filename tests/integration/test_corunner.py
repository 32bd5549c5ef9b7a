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


def test_usage_is_reported_when_the_replay_ends_before_the_corunner_would_stop(monkeypatch):
    import asyncio

    from scripts import replay as replay_mod

    async def short_replay(*args, **kwargs):
        await asyncio.sleep(0.6)
        return []

    monkeypatch.setattr(replay_mod, "replay", short_replay)
    usage: dict = {}
    records = asyncio.run(replay_mod.replay_with_corunner("localhost:1", "m", None, {}, 0.0, 100.0, usage=usage))
    assert records == [] and usage.get("asked_cores") == 1.0 and usage.get("cpu_s", 0) > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-process niceness via /proc semantics")
@pytest.mark.parametrize("nice", [0, 7])
def test_burner_runs_at_its_own_niceness_not_its_parents(nice):
    # The parent raises its niceness value (no privilege needed), in a child process so the runner's stays.
    import subprocess

    code = ("import os, time; from scripts.corunner import CpuBurner; os.setpriority(os.PRIO_PROCESS, 0, 3)\n"
            f"expect = {nice} if {nice} >= 3 or os.geteuid() == 0 else 3\n"
            f"b = CpuBurner(n_procs=1, nice={nice}); b.start(); t_end = time.monotonic() + 10\n"
            "while os.getpriority(os.PRIO_PROCESS, b.pids[0]) != expect and time.monotonic() < t_end:\n"
            "    time.sleep(0.02)\n"
            "print(expect, os.getpriority(os.PRIO_PROCESS, b.pids[0])); b.stop()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    # From 3 down to 0 needs CAP_SYS_NICE; without it the burner stays at its parent's 3.
    expect, got = map(int, out[-2:])
    assert got == expect
