"""ContentionMonitor: pure parsing/smoothing/clamping with injected inputs; a live sample is finite and >= 0."""

from __future__ import annotations

import math
import os

import pytest

from slonn.policy.contention import GPU_SAMPLE_HOLD_S, ContentionMonitor, GpuSampler, Smoother, combine, others_gpu_busy, \
    descendants, others_load, parse_procs_running, probe_slowdown, task_state

STAT = "cpu  1 2 3 4\ncpu0 1 2 3 4\nintr 5\nctxt 6\nprocs_running 5\nprocs_blocked 0\n"


def test_parse_procs_running():
    assert parse_procs_running(STAT) == 5
    with pytest.raises(ValueError):
        parse_procs_running("cpu 1 2 3\n")


def test_task_state_handles_parens_and_spaces_in_comm():
    assert task_state("123 (python) R 1 2 3") == "R"
    assert task_state("123 (my (odd) name) S 1 2 3") == "S"


def test_others_load_subtracts_our_tasks_and_clamps():
    assert others_load(5, 2, 2) == 1.5
    assert others_load(2, 3, 2) == 0.0  # a race between the two reads never goes negative


def test_probe_slowdown_clamps_and_rejects_garbage():
    assert probe_slowdown(0.3, 0.15) == pytest.approx(1.0)
    assert probe_slowdown(0.1, 0.15) == 0.0
    assert probe_slowdown(float("nan"), 0.15) == 0.0
    assert probe_slowdown(0.2, 0.0) == 0.0


def test_smoother_mean_and_median_over_window_ignore_nan():
    mean = Smoother(3, "mean")
    assert mean.value == 0.0
    for x in (1.0, 2.0, float("nan"), 3.0, 4.0):
        mean.push(x)
    assert mean.value == pytest.approx(3.0)
    med = Smoother(3, "median")
    for x in (0.0, 10.0, 0.1):
        med.push(x)
    assert med.value == pytest.approx(0.1)  # one spike does not move the median


def test_combine_modes():
    assert combine(0.5, 2.0, "load") == 0.5
    assert combine(0.5, 2.0, "probe") == 2.0
    assert combine(0.5, 2.0, "max") == 2.0
    assert combine(0.5, 2.0, "gpu", gpu=0.8) == 0.8 and combine(0.5, 2.0, "gpu", gpu=0.1) == 0.5


def _fake_proc(tmp_path, procs_running: int, states: dict[int, str]):
    (tmp_path / "stat").write_text(STAT.replace("procs_running 5", f"procs_running {procs_running}"))
    for i, (pid, st) in enumerate(states.items()):
        task = tmp_path / str(pid) / "task" / str(pid)
        task.mkdir(parents=True)
        (task / "stat").write_text(f"{pid} (python w{i}) {st} 1 2 3\n")


def test_monitor_on_injected_proc_tree_subtracts_own_running_tasks(tmp_path):
    me = os.getpid()
    _fake_proc(tmp_path, procs_running=4, states={me: "R", 4242: "R"})
    clock = iter(float(i) for i in range(100))
    mon = ContentionMonitor(own_pids=[4242], probe=False, window=2, clock=lambda: next(clock),
                            proc_root=str(tmp_path))
    n_cpus = mon.n_cpus
    assert mon.sample_once() == pytest.approx(2 / n_cpus)  # 4 runnable, 2 of them ours
    assert mon.last.load == pytest.approx(2 / n_cpus)
    mon.remove_own_pid(4242)
    assert mon.sample_once() == pytest.approx((2 / n_cpus + 3 / n_cpus) / 2)  # smoothed over the window
    assert [t for t, _ in mon.history] == [0.0, 1.0]


def test_a_frontend_counts_every_process_of_its_group_as_its_own(tmp_path):
    # 100: the `--frontends` parent; 200 (this monitor's frontend) and 300: frontends; 301: 300's worker.
    me = os.getpid()
    _fake_proc(tmp_path, procs_running=3, states={me: "R", 100: "S", 300: "R", 301: "R"})
    (tmp_path / "100" / "task" / "100" / "children").write_text(f"{me} 300\n")
    (tmp_path / "300" / "task" / "300" / "children").write_text("301\n")
    assert sorted(descendants(100, str(tmp_path))) == sorted([me, 300, 301])
    clock = iter(float(i) for i in range(100))
    mon = ContentionMonitor(probe=False, window=1, clock=lambda: next(clock), proc_root=str(tmp_path))
    assert mon.sample_once() == pytest.approx(2 / mon.n_cpus)  # the other frontend and its worker: others
    mon.add_own_tree(100)
    assert mon.sample_once() == pytest.approx(0.0)  # the same server: not contention


def test_live_monitor_returns_finite_non_negative_values():
    mon = ContentionMonitor(interval_s=0.01)
    values = [mon.sample_once() for _ in range(5)]
    assert all(math.isfinite(v) and v >= 0 for v in values)
    assert mon.baseline_ms > 0
    assert mon.value == values[-1] and len(mon.history) == 5
    comp = mon.components()
    assert comp["load"] >= 0 and comp["probe"] >= 0


def test_monitor_thread_starts_and_stops():
    with ContentionMonitor(interval_s=0.01, probe=False) as mon:
        mon._stop.wait(0.05)
    assert mon._thread is None and mon.value >= 0


def test_monitor_rejects_bad_config():
    with pytest.raises(ValueError, match="mode"):
        ContentionMonitor(mode="nope", probe=False)


def test_time_call_counts_time_off_the_cpu_as_a_pause():
    import time

    from slonn.policy.contention import CallTimes, time_call

    out, times = time_call(lambda s: time.sleep(s) or "done", 0.02)
    assert out == "done"
    assert times.wall_ms >= 20.0 and times.cpu_ms < times.wall_ms  # sleeping is wall time without CPU time
    assert times.host_pause_ms == pytest.approx(times.wall_ms - times.cpu_ms - (times.runq_ms or 0.0))
    assert CallTimes(10.0, 9.0, 2.0).host_pause_ms == 0.0  # never negative


def test_thread_runq_reads_the_second_schedstat_field(tmp_path):
    from slonn.policy.contention import thread_runq_ns

    (tmp_path / "thread-self").mkdir()
    (tmp_path / "thread-self" / "schedstat").write_text("123456 7890 42\n")
    assert thread_runq_ns(str(tmp_path)) == 7890
    assert thread_runq_ns(str(tmp_path / "missing")) is None  # a kernel without schedstats


# ----------------------------------------------------------------------------- GPU neighbours (fake NVML)


class _Sample:
    def __init__(self, pid: int, ts: int, sm: int) -> None:
        self.pid, self.timeStamp, self.smUtil = pid, ts, sm


class _FakeNvml:
    """The slice of pynvml the monitor uses: process samples newer than a timestamp, device utilisation."""

    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NOT_FOUND = 6

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(value)
            self.value = value

    def __init__(self, samples=(), device_util: int = 0, error: int | None = None) -> None:
        self.samples, self.device_util, self.error = list(samples), device_util, error
        self.asked_since: list[int] = []

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int):
        if index != 0:
            raise self.NVMLError(2)
        return "gpu0"

    def nvmlDeviceGetHandleByUUID(self, uuid: str):
        if uuid != "GPU-0000":
            raise self.NVMLError(2)
        return "gpu0"

    def nvmlDeviceGetProcessUtilization(self, handle, last_seen: int):
        self.asked_since.append(last_seen)
        if self.error is not None:
            raise self.NVMLError(self.error)
        return [s for s in self.samples if s.timeStamp > last_seen]

    def nvmlDeviceGetUtilizationRates(self, handle):
        return type("Rates", (), {"gpu": self.device_util})()


def test_others_gpu_busy_sums_the_latest_sample_of_every_other_process():
    samples = [_Sample(10, 1, 90), _Sample(10, 5, 30), _Sample(11, 4, 20), _Sample(99, 5, 70)]
    assert others_gpu_busy(samples, own_pids=[99]) == pytest.approx(0.5)  # 30 (latest of 10) + 20
    assert others_gpu_busy(samples, own_pids=[]) == pytest.approx(1.0)   # 120% clamps to the whole GPU
    assert others_gpu_busy([], own_pids=[1]) == 0.0


def test_gpu_sampler_reads_only_new_samples_and_leaves_ours_out():
    nvml = _FakeNvml([_Sample(10, 100, 40), _Sample(20, 100, 50)])
    sampler = GpuSampler.open(0, nvml)
    assert sampler.others({20}) == pytest.approx(0.4)
    nvml.samples.append(_Sample(10, 200, 10))
    assert sampler.others({20}) == pytest.approx(0.1)  # only the sample after t=100
    assert nvml.asked_since == [0, 100]


def test_gpu_sampler_nobody_since_is_zero_and_no_per_process_support_is_no_signal():
    idle = GpuSampler.open(0, _FakeNvml(error=_FakeNvml.NVML_ERROR_NOT_FOUND, device_util=80))
    assert idle.others(set()) == 0.0 and idle.per_process
    # The whole device's utilisation would count our own batches as contention: no signal instead.
    old = GpuSampler.open(0, _FakeNvml(error=_FakeNvml.NVML_ERROR_NOT_SUPPORTED, device_util=80))
    assert old.others(set()) is None and not old.per_process
    broken = GpuSampler.open(0, _FakeNvml(error=999))
    assert broken.others(set()) is None and broken.per_process  # a hiccup: try again next time
    assert GpuSampler.open(1, _FakeNvml()) is None  # no such GPU: no sampler, a warning
    assert GpuSampler.open("GPU-0000", _FakeNvml()) is not None  # as a worker names its GPU
    assert GpuSampler.open("GPU-ffff", _FakeNvml()) is None


def test_a_gpu_reading_stands_between_the_drivers_samples_and_lapses_without_them():
    nvml = _FakeNvml([_Sample(10, 100, 60)])
    now = [0.0]
    sampler = GpuSampler.open(0, nvml, clock=lambda: now[0])
    assert sampler.others(set()) == pytest.approx(0.6)
    now[0] = 0.5  # polled faster than the driver samples: nothing new, the reading stands
    assert sampler.others(set()) == pytest.approx(0.6)
    now[0] = 0.5 + GPU_SAMPLE_HOLD_S + 0.1  # no sample for longer than the hold: nobody is using it
    assert sampler.others(set()) == 0.0
    nvml.error = _FakeNvml.NVML_ERROR_NOT_FOUND  # NVML's way of saying "nothing new"
    assert sampler.others(set()) == 0.0


def test_monitor_in_gpu_mode_takes_the_larger_of_cpu_load_and_others_gpu_share(tmp_path):
    me = os.getpid()
    _fake_proc(tmp_path, procs_running=1, states={me: "R"})  # nobody else on the CPUs
    nvml = _FakeNvml([_Sample(4242, 1, 60), _Sample(me, 1, 35)])
    mon = ContentionMonitor(probe=False, window=1, proc_root=str(tmp_path))
    assert mon.watch_gpu("GPU-0000", nvml) and mon.mode == "gpu"
    assert mon.sample_once() == pytest.approx(0.6)  # our own 35% is not contention
    assert mon.last.gpu == pytest.approx(0.6) and mon.components()["gpu"] == pytest.approx(0.6)
    (tmp_path / "busy").mkdir()
    _fake_proc(tmp_path / "busy", procs_running=1 + 3 * mon.n_cpus, states={me: "R"})
    busy = ContentionMonitor(probe=False, window=1, proc_root=str(tmp_path / "busy"))
    assert busy.watch_gpu(0, _FakeNvml())
    assert busy.sample_once() == pytest.approx(3.0)  # CPUs crowded, GPU idle: the CPU load shows


def test_a_gpu_that_cannot_be_watched_leaves_the_cpu_signal(caplog):
    mon = ContentionMonitor(probe=False)
    assert not mon.watch_gpu("GPU-ffff", _FakeNvml())
    assert mon.mode == "load" and "covers the CPUs only" in caplog.text
    assert mon.components()["gpu"] is None


def test_a_gpu_share_does_not_outlive_nvml_going_silent(tmp_path):
    me = os.getpid()
    _fake_proc(tmp_path, procs_running=1, states={me: "R"})  # nobody else on the CPUs
    nvml = _FakeNvml([_Sample(4242, 1, 80)])
    now = [0.0]
    mon = ContentionMonitor(probe=False, window=3, proc_root=str(tmp_path), clock=lambda: now[0])
    assert mon.watch_gpu("GPU-0000", nvml)
    assert mon.sample_once() == pytest.approx(0.8)
    nvml.error = 999  # the driver stops answering, and the neighbour leaves
    now[0] = 0.5
    assert mon.sample_once() == pytest.approx(0.8)  # a gap shorter than a reading stands: it holds
    for _ in range(3):
        now[0] += GPU_SAMPLE_HOLD_S
        mon.sample_once()
    assert mon.value == 0.0 and mon.last.gpu is None
