"""Contention signal: how much of the machine *other* processes want right now.

The monitor does not know about any co-runner. Each sample (every ~50 ms, in a
daemon thread) reads:

- ``load``: runnable tasks that are not ours, per CPU. ``/proc/stat``'s
  ``procs_running`` counts every runnable task on the machine at this instant;
  we subtract the runnable threads of our own processes (this process and the
  worker pids we were told about). Averaged over a few samples it estimates the
  CPU demand of everyone else in cores / n_cpus: 0 on an idle machine, 0.5 for
  one busy process on 2 cores, 1.0 for two, ... It keeps growing when the
  machine is oversubscribed (CPU *usage* would saturate at the core count) and
  it does not depend on whether our own worker happens to be busy.
- ``probe``: slowdown of a tiny fixed numpy loop (~100-200 us) against its
  calibrated baseline, ``probe_ms / baseline_ms - 1`` clamped at 0. Cheap
  evidence of interference that the run queue cannot see (memory bandwidth,
  a noisy neighbour VM), but noisy: Linux lets a briefly-sleeping thread
  run at once, so a short probe sees little of a CPU hog.
- ``gpu`` (after ``watch_gpu``, which a server whose workers run on a GPU
  calls): the share of that GPU's time in which processes other than ours
  kept its SMs busy, from NVML's per-process utilisation (``pynvml``,
  optional). None where the driver does not report per process.

``value`` (the model's feature) is the smoothed ``load`` by default
(``mode="load"``); ``mode="probe"`` or ``"max"`` (max of both) are options.
``watch_gpu`` makes it ``mode="gpu"``, the max of ``load`` and ``gpu``: a
neighbour on the GPU slows the model, one on the CPUs the code around it.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

log = logging.getLogger(__name__)

MODES = ("load", "probe", "max")
"""The modes a monitor starts in; :meth:`ContentionMonitor.watch_gpu` switches to "gpu"."""


# --------------------------------------------------------------------------- pure parts


def parse_procs_running(stat_text: str) -> int:
    """``procs_running`` from the text of ``/proc/stat``."""
    for line in stat_text.splitlines():
        if line.startswith("procs_running"):
            return int(line.split()[1])
    raise ValueError("/proc/stat has no procs_running line")


def task_state(task_stat_text: str) -> str:
    """The state letter of a ``/proc/<pid>/task/<tid>/stat`` line (the comm may hold spaces/parens)."""
    return task_stat_text[task_stat_text.rindex(")") + 2]


def descendants(root_pid: int, proc_root: str = "/proc") -> list[int]:
    """Every process below ``root_pid`` (children started by any of its threads, and theirs), from /proc."""
    out: list[int] = []
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        try:
            tids = os.listdir(f"{proc_root}/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"{proc_root}/{pid}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


def others_load(procs_running: int, own_running: int, n_cpus: int) -> float:
    """Runnable tasks that are not ours, per CPU (>= 0)."""
    return max(0, procs_running - own_running) / n_cpus


def probe_slowdown(probe_ms: float, baseline_ms: float) -> float:
    """``probe_ms / baseline_ms - 1``, clamped to >= 0 (a probe faster than baseline is no contention)."""
    if not (probe_ms > 0 and baseline_ms > 0 and np.isfinite(probe_ms)):
        return 0.0
    return max(0.0, probe_ms / baseline_ms - 1.0)


class Smoother:
    """Mean (or median) of the last ``window`` finite samples."""

    def __init__(self, window: int, kind: str = "mean") -> None:
        if window < 1 or kind not in ("mean", "median"):
            raise ValueError(f"Smoother(window={window}, kind={kind!r}): need window >= 1, kind 'mean' or 'median'")
        self.kind = kind
        self._buf: collections.deque[float] = collections.deque(maxlen=window)

    def push(self, x: float) -> float:
        if np.isfinite(x):
            self._buf.append(float(x))
        return self.value

    @property
    def value(self) -> float:
        if not self._buf:
            return 0.0
        return statistics.fmean(self._buf) if self.kind == "mean" else statistics.median(self._buf)


def combine(load: float, probe: float, mode: str, gpu: float = 0.0) -> float:
    """The model feature from the smoothed components."""
    if mode == "load":
        return load
    if mode == "probe":
        return probe
    if mode == "gpu":
        return max(load, gpu)
    return max(load, probe)


def others_gpu_busy(samples: Iterable, own_pids: Iterable[int]) -> float:
    """Share of a GPU's time, in [0, 1], that processes other than ``own_pids`` kept its SMs busy: from
    NVML process-utilisation samples (``pid``, ``timeStamp``, ``smUtil`` in percent), the latest per
    process, summed over the others."""
    latest: dict[int, tuple[int, float]] = {}
    for s in samples:
        if s.pid not in latest or s.timeStamp >= latest[s.pid][0]:
            latest[s.pid] = (s.timeStamp, float(s.smUtil))
    own = set(own_pids)
    return min(1.0, sum(util for pid, (_, util) in latest.items() if pid not in own) / 100.0)


# --------------------------------------------------------------------------- probe


def _probe_kernel(a: np.ndarray, iters: int) -> float:
    """A fixed compute loop on a small (L1-resident) array; returns its wall ms."""
    t0 = time.perf_counter()
    acc = a
    for _ in range(iters):
        acc = np.tanh(acc * 0.5 + 0.1)
    return (time.perf_counter() - t0) * 1e3


@dataclass(frozen=True)
class ContentionReading:
    """One sample: raw components and the smoothed value."""

    t_s: float
    load: float
    """Instantaneous others' runnable tasks per CPU."""
    probe: float
    """Probe slowdown (0 if the probe is off)."""
    gpu: float | None
    """Others' share of the watched GPU's time in [0, 1] (:class:`GpuSampler`); None without one."""
    value: float
    """Smoothed model feature after this sample."""


class ContentionMonitor:
    """Samples contention cheaply and continuously; ``value`` is the latest smoothed signal."""

    def __init__(self, interval_s: float = 0.05, window: int = 10, mode: str = "load",
                 probe: bool = True, probe_every: int = 2, own_pids: Iterable[int] = (),
                 history_len: int = 2400, clock: Callable[[], float] = time.monotonic,
                 proc_root: str = "/proc") -> None:
        if interval_s <= 0 or mode not in MODES or probe_every < 1:
            raise ValueError(f"ContentionMonitor(interval_s={interval_s}, mode={mode!r}, probe_every={probe_every}): "
                             f"need interval_s > 0, mode in {MODES}, probe_every >= 1")
        if mode in ("probe", "max") and not probe:
            raise ValueError(f"mode={mode!r} needs probe=True")
        self.interval_s = interval_s
        self.mode = mode
        self.n_cpus = os.cpu_count() or 1
        self.history: collections.deque[tuple[float, float]] = collections.deque(maxlen=history_len)
        """(t_s, value) after every sample."""
        self.last: ContentionReading | None = None
        self._clock = clock
        self._proc = proc_root
        self._own_pids = {os.getpid(), *own_pids}
        self._own_root: int | None = None
        self._tids: dict[int, list[str]] = {}
        self._tids_at = -1e9
        self._load = Smoother(window, "mean")    # counts are 0/1-ish per sample: average them
        self._probe = Smoother(max(3, window // probe_every), "median")  # probe outliers: median
        self._use_probe = probe
        self._probe_every = probe_every
        self._probe_array = np.linspace(-1.0, 1.0, 256)
        self._probe_iters = 40
        self._baseline_ms = 0.0
        self._n = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gpu_sampler: GpuSampler | None = None
        self._gpu = Smoother(window, "mean")
        self._gpu_read_s = -math.inf
        """When NVML last gave a reading (the GPU share holds through its gaps for GPU_SAMPLE_HOLD_S)."""
        if probe:
            self.calibrate_probe()

    def watch_gpu(self, gpu: int | str, nvml=None) -> bool:
        """Watch GPU ``gpu`` (an NVML index, or "GPU-<uuid>" as a worker reports it) for other processes and
        make the feature the max of CPU load and their share of it (mode "gpu"). Returns False, with a
        warning, without NVML (``pip install nvidia-ml-py``) or that GPU: the monitor then watches the CPUs
        only. ``nvml``: the pynvml module (tests pass a fake)."""
        sampler = GpuSampler.open(gpu, nvml)
        if sampler is None:
            return False
        with self._lock:
            self._gpu_sampler = sampler
            self.mode = "gpu"
        return True

    # ----------------------------------------------------------------- own processes

    def add_own_pid(self, pid: int) -> None:
        """Count ``pid`` (e.g. a worker process) as ours: its runnable threads are not contention."""
        with self._lock:
            self._own_pids.add(pid)
            self._tids_at = -1e9

    def add_own_tree(self, root_pid: int) -> None:
        """Count every descendant of ``root_pid`` as ours too (the other frontends of one server and their
        workers), as they are at each refresh of the thread lists."""
        with self._lock:
            self._own_root = root_pid
            self._tids_at = -1e9

    def remove_own_pid(self, pid: int) -> None:
        with self._lock:
            self._own_pids.discard(pid)
            self._tids.pop(pid, None)

    def _own_running(self, now_s: float) -> int:
        if now_s - self._tids_at > 2.0:  # thread lists change rarely: refresh every 2 s
            self._tids = {}
            pids = set(self._own_pids)
            if self._own_root is not None:
                pids.update((self._own_root, *descendants(self._own_root, self._proc)))
            for pid in pids:
                try:
                    self._tids[pid] = os.listdir(f"{self._proc}/{pid}/task")
                except OSError:
                    continue
            self._tids_at = now_s
        n = 0
        for pid, tids in self._tids.items():
            for tid in tids:
                try:
                    with open(f"{self._proc}/{pid}/task/{tid}/stat") as f:
                        n += task_state(f.read()) == "R"
                except (OSError, ValueError):
                    continue
        return n

    # ----------------------------------------------------------------- sampling

    def calibrate_probe(self, repeats: int = 40) -> float:
        """Size the probe to ~150 us and take its baseline (min over repeats; run on a quiet machine)."""
        one = min(_probe_kernel(self._probe_array, 1) for _ in range(20))
        self._probe_iters = int(np.clip(0.15 / max(one, 1e-4), 5, 400))
        self._baseline_ms = min(_probe_kernel(self._probe_array, self._probe_iters) for _ in range(repeats))
        log.debug("contention probe: %d iters, baseline %.3f ms", self._probe_iters, self._baseline_ms)
        return self._baseline_ms

    @property
    def baseline_ms(self) -> float:
        return self._baseline_ms

    def sample_once(self) -> float:
        """Take one sample now; returns the new smoothed value."""
        now_s = self._clock()
        with self._lock:
            try:
                with open(f"{self._proc}/stat") as f:
                    running = parse_procs_running(f.read())
                load = others_load(running, self._own_running(now_s), self.n_cpus)
            except (OSError, ValueError):
                load = float("nan")
            probe = float("nan")
            if self._use_probe and self._n % self._probe_every == 0:
                probe = probe_slowdown(_probe_kernel(self._probe_array, self._probe_iters), self._baseline_ms)
            gpu = self._gpu_sampler.others(self._own_pids) if self._gpu_sampler is not None else None
            self._n += 1
            if gpu is not None:
                self._gpu_read_s, gpu_in = now_s, gpu
            else:  # NVML failed, or stopped reporting per process: the last share stands only as long as a
                # reading would, then counts as nobody (it would otherwise stay in the smoother for good)
                gpu_in = float("nan") if now_s - self._gpu_read_s <= GPU_SAMPLE_HOLD_S else 0.0
            value = combine(self._load.push(load), self._probe.push(probe), self.mode, self._gpu.push(gpu_in))
            self.last = ContentionReading(now_s, load, probe, gpu, value)
            self.history.append((now_s, value))
        log.debug("contention t=%.3f load=%.3f probe=%.3f gpu=%s value=%.3f", now_s, load, probe, gpu, value)
        return value

    @property
    def value(self) -> float:
        """Latest smoothed contention (0.0 before the first sample)."""
        last = self.last
        return last.value if last is not None else 0.0

    def components(self) -> dict:
        """Smoothed components, for logging and the profile CSV."""
        return {"load": self._load.value, "probe": self._probe.value,
                "gpu": self._gpu.value if self._gpu_sampler is not None else None}

    # ----------------------------------------------------------------- thread

    def start(self) -> "ContentionMonitor":
        if self._thread is not None:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="contention-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception:  # never let the monitor die silently and freeze the signal
                log.exception("contention sample failed")
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "ContentionMonitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- host pauses, per call


def thread_runq_ns(proc_root: str = "/proc") -> int | None:
    """Nanoseconds the calling thread has waited on a run queue behind other tasks of this machine
    (``/proc/thread-self/schedstat``, second field); None where the kernel keeps no schedstats."""
    try:
        with open(f"{proc_root}/thread-self/schedstat") as f:
            return int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class CallTimes:
    """Where one call's wall time went, measured on the calling thread."""

    wall_ms: float
    cpu_ms: float
    """The thread's CPU time over the call (``time.thread_time_ns``)."""
    runq_ms: float | None
    """Time the thread waited on the run queue behind other tasks of this machine (None: no schedstats)."""

    @property
    def host_pause_ms(self) -> float:
        """Wall time in which the thread neither ran nor waited for a CPU of this machine: on a VM, the
        hypervisor running someone else on our vCPU (steal). Only meaningful when the call computes on the
        calling thread alone (one torch thread, CPU)."""
        return max(0.0, self.wall_ms - self.cpu_ms - (self.runq_ms or 0.0))


def time_call(fn: Callable, *args):
    """``fn(*args)`` and its :class:`CallTimes`."""
    q0, c0 = thread_runq_ns(), time.thread_time_ns()
    w0 = time.perf_counter_ns()
    out = fn(*args)
    w1 = time.perf_counter_ns()
    c1, q1 = time.thread_time_ns(), thread_runq_ns()
    runq = None if q0 is None or q1 is None else (q1 - q0) / 1e6
    return out, CallTimes((w1 - w0) / 1e6, (c1 - c0) / 1e6, runq)


# --------------------------------------------------------------------------- optional NVML


GPU_SAMPLE_HOLD_S = 1.0
"""How long a GPU reading stands when NVML has no newer process sample. The driver samples utilisation every
~1/6 s, more slowly than the monitor polls: a poll in between finds nothing new, which says "no news", not
"nobody is using the GPU". Only after this long without a sample is the GPU taken to be idle."""


class GpuSampler:
    """Others' use of one GPU, from NVML (``pynvml``, from the nvidia-ml-py package; optional)."""

    def __init__(self, nvml, handle, gpu: int | str, clock: Callable[[], float] = time.monotonic) -> None:
        self._nvml = nvml
        self._handle = handle
        self.gpu = gpu
        self._clock = clock
        self._last_ts = 0
        self._held = 0.0     # the latest per-process reading
        self._held_at = -1e9
        self.per_process = True
        """False once the driver said it does not report utilisation per process: :meth:`others` then
        returns None (the device's whole utilisation would count our own batches as contention)."""

    @classmethod
    def open(cls, gpu: int | str, nvml=None, clock: Callable[[], float] = time.monotonic) -> "GpuSampler | None":
        """A sampler for GPU ``gpu`` (NVML index or "GPU-<uuid>"), or None (with a warning) without NVML or
        that GPU."""
        try:
            if nvml is None:
                import pynvml as nvml  # optional: only on GPU machines
            nvml.nvmlInit()
            handle = (nvml.nvmlDeviceGetHandleByUUID(gpu) if isinstance(gpu, str)
                      else nvml.nvmlDeviceGetHandleByIndex(gpu))
            return cls(nvml, handle, gpu, clock)
        except Exception as exc:  # noqa: BLE001 - no pynvml, no driver, no such GPU: no GPU signal
            log.warning("contention: GPU %s not watched, the signal covers the CPUs only (%r)", gpu, exc)
            return None

    def others(self, own_pids: Iterable[int]) -> float | None:
        """Others' share of the GPU's time in [0, 1], from the process samples newer than the last call's
        (with none, the last reading for up to :data:`GPU_SAMPLE_HOLD_S`, then 0); None if NVML failed or
        does not report per process."""
        if not self.per_process:
            return None
        nvml = self._nvml
        try:
            try:
                samples = nvml.nvmlDeviceGetProcessUtilization(self._handle, self._last_ts)
            except nvml.NVMLError as exc:
                if exc.value == nvml.NVML_ERROR_NOT_SUPPORTED:
                    self.per_process = False
                    log.warning("contention: GPU %s reports no per-process utilisation: the signal covers the "
                                "CPUs only", self.gpu)
                    return None
                if exc.value != nvml.NVML_ERROR_NOT_FOUND:  # NOT_FOUND: no sample since the last call
                    raise
                samples = []
        except Exception as exc:  # noqa: BLE001 - a driver hiccup must not stop the monitor
            log.debug("contention: NVML read failed on GPU %s: %r", self.gpu, exc)
            return None
        now = self._clock()
        if samples:
            self._last_ts = max(self._last_ts, *(s.timeStamp for s in samples))
            self._held, self._held_at = others_gpu_busy(samples, own_pids), now
        elif now - self._held_at > GPU_SAMPLE_HOLD_S:
            self._held = 0.0
        return self._held
