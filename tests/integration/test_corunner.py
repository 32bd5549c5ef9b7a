"""The co-runner reports the CPU it got, so a replay can show it really took its core."""

from __future__ import annotations

import os
import sys
import time

import pytest

from slonn.workers.corunner import CpuBurner


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

    from slonn.scheduler import replay as replay_mod

    async def short_replay(*args, on_start=None, **kwargs):
        on_start(time.monotonic())
        await asyncio.sleep(0.6)
        return []

    monkeypatch.setattr(replay_mod, "replay", short_replay)
    usage: dict = {}
    records = asyncio.run(replay_mod.replay_with_corunner("localhost:1", "m", None, {}, 0.0, 100.0, usage=usage))
    assert records == [] and usage.get("asked_cores") == 1.0 and usage.get("cpu_s", 0) > 0
    # The replay's co-runner asks for niceness 0 (from a runner above 0 that needs CAP_SYS_NICE).
    assert usage.get("niceness") == 0 or os.getpriority(os.PRIO_PROCESS, 0) > 0


def test_the_corunner_window_counts_from_the_replays_first_send(monkeypatch):
    """The replay's set-up (channel, data) comes before its t = 0: the co-runner must not start during it."""
    import asyncio

    from slonn.scheduler import replay as replay_mod
    from slonn.workers import corunner

    events = []

    async def slow_start_replay(*args, on_start=None, **kwargs):
        await asyncio.sleep(0.3)  # set-up
        events.append(("t0", time.monotonic()))
        on_start(events[-1][1])
        await asyncio.sleep(0.3)
        return []

    def fake_start(self):
        events.append(("burner", time.monotonic()))
        return self

    monkeypatch.setattr(replay_mod, "replay", slow_start_replay)
    monkeypatch.setattr(corunner.CpuBurner, "start", fake_start)
    seen = []
    asyncio.run(replay_mod.replay_with_corunner("localhost:1", "m", None, {}, 0.0, 100.0,
                                                on_start=seen.append))
    assert [e[0] for e in events] == ["t0", "burner"]
    assert seen == [events[0][1]]  # the caller's own on_start still gets the origin


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux niceness semantics")
@pytest.mark.parametrize("nice", [0, 19])
def test_burner_runs_at_its_own_niceness_not_its_parents(nice):
    # In a child process (the runner's niceness stays): the parent raises its niceness value (no privilege
    # needed), then checks whether it may lower it again (CAP_SYS_NICE, which root in a container may lack).
    import subprocess

    code = ("import os, time; from workers.corunner import CpuBurner\n"
            "parent = max(os.getpriority(os.PRIO_PROCESS, 0), 3); os.setpriority(os.PRIO_PROCESS, 0, parent)\n"
            "try:\n    os.setpriority(os.PRIO_PROCESS, 0, parent - 1); os.setpriority(os.PRIO_PROCESS, 0, parent)"
            "; privileged = True\nexcept PermissionError:\n    privileged = False\n"
            f"if {nice} < parent and not privileged:\n    print('unprivileged'); raise SystemExit(0)\n"
            f"expect = {nice}\n"
            f"b = CpuBurner(n_procs=1, nice={nice}); b.start(); t_end = time.monotonic() + 10\n"
            "while os.getpriority(os.PRIO_PROCESS, b.pids[0]) != expect and time.monotonic() < t_end:\n"
            "    time.sleep(0.02)\n"
            "print(expect, os.getpriority(os.PRIO_PROCESS, b.pids[0])); b.stop()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out == ["unprivileged"]:
        pytest.skip("lowering the niceness needs CAP_SYS_NICE")
    expect, got = map(int, out[-2:])
    assert got == expect


def test_the_device_burner_runs_its_kernel_loop_and_stops():
    """On "cpu" the device burner's loop (torch matrix products, the GPU co-runner's body) runs without a GPU."""
    from slonn.workers.corunner import DeviceBurner

    burner = DeviceBurner("cpu", n_procs=2, duty=0.5)
    burner.start()  # returns once both processes have run a product
    procs = list(burner._procs)
    try:
        assert burner.products >= 2
    finally:
        burner.stop()
    assert [p.exitcode for p in procs] == [0, 0]  # they ended at stop(), not by crashing
    usage = burner.usage()
    assert usage["kind"] == "device" and usage["device"] == "cpu" and usage["products"] >= 2


def test_a_device_burner_that_cannot_burn_says_so():
    from slonn.workers.corunner import DeviceBurner

    burner = DeviceBurner("cuda:99", n_procs=1)  # no such GPU: the child dies before its first product
    with pytest.raises(RuntimeError, match="exited"):
        burner.start()
    assert burner.pids == []


def test_make_burner_picks_the_burner_for_the_device():
    from slonn.workers.corunner import CpuBurner, DeviceBurner, make_burner

    assert type(make_burner("cpu", 2, 0.5)) is CpuBurner
    gpu = make_burner("cuda:1", 1, nice=0)
    assert isinstance(gpu, DeviceBurner) and gpu.device == "cuda:1" and gpu.nice == 0 and gpu.intensity == 1.0


def test_corunner_device_resolves_auto_and_names_a_bad_value():
    import torch

    from slonn.workers.corunner import corunner_device

    assert corunner_device("cpu") == "cpu"
    assert corunner_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'tpu'"):
        corunner_device("tpu")
    with pytest.raises(ValueError, match="'cudax'"):
        corunner_device("cudax")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            corunner_device("cuda")


def test_replay_names_a_bad_corunner_device(capsys):
    from slonn.scripts import replay

    with pytest.raises(SystemExit):
        replay.main(["--corunner-start-s", "1", "--corunner-device", "tpu"])
    assert "--corunner-device" in capsys.readouterr().err
