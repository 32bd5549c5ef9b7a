"""An interference co-runner: processes that burn CPU, or a GPU, with a duty cycle.

Used by ``slonn profile`` to measure the model under contention, and by the
replay tool to start interference mid-run::

    with CpuBurner(n_procs=2, duty=1.0):
        ...  # two cores busy-looping

    with make_burner("cuda:0", n_procs=1):
        ...  # one process keeping GPU 0 busy with matrix products

Each process works for ``duty * period_s`` then sleeps for the rest of the
period, so ``intensity = n_procs * duty`` is the CPU (in cores), or the share
of the GPU's time, it asks for. A GPU neighbour is what slows a model served on
a GPU; a CPU one mostly slows the host code around it. Processes come from the
``spawn`` context (no fork of a process holding torch threads or an event loop).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass

from slonn.workers.placement import set_cpus, set_niceness


def _duty_loop(stop, duty: float, period_s: float, step) -> None:
    """Call ``step()`` for ``duty`` of every period and sleep the rest, until ``stop`` is set or the parent is
    gone (a killed parent must not leave burners behind)."""
    busy_s = duty * period_s
    idle_s = period_s - busy_s
    parent = os.getppid()
    while not stop.is_set() and os.getppid() == parent:
        t_end = time.perf_counter() + busy_s
        while time.perf_counter() < t_end:
            step()
        if idle_s > 0:
            time.sleep(idle_s)


def _place(nice: int | None, cpus: tuple[int, ...] | None) -> None:
    """A burner child's niceness (absolute; None: its parent's) and CPUs (None: its parent's)."""
    if nice is not None:
        set_niceness(nice)
    set_cpus(cpus)


def _burn(stop, duty: float, period_s: float, nice: int | None = None, cpus: tuple[int, ...] | None = None) -> None:
    """Child body: busy-loop ``duty`` of every period until ``stop`` is set (or the parent is gone)."""
    _place(nice, cpus)

    def spin() -> None:
        x = 0
        for i in range(200):  # pure-Python arithmetic: keeps one core at 100%
            x = (x * 1103515245 + i) & 0xFFFFFFFF

    _duty_loop(stop, duty, period_s, spin)


DEVICE_BURN_N = 2048
"""Side of the square matrices a device burner multiplies: ~17 GFLOP a product, about a millisecond in fp32 on
a data-centre GPU, so a burner's busy phase is many short kernels and its duty cycle holds to within one."""


def _burn_device(stop, duty: float, period_s: float, nice: int | None, cpus: tuple[int, ...] | None,
                 device: str, ready, products) -> None:
    """Child body of a device burner: ``duty`` of every period spent in matrix products on ``device``
    (waiting for each, so the queue it leaves the GPU is one kernel long), the rest asleep. Adds 1 to
    ``ready`` after its first product (torch's import and the CUDA context take seconds) and counts its
    products in ``products``. On "cpu" the products run on one CPU thread (what the tests exercise)."""
    import torch

    _place(nice, cpus)
    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    n = DEVICE_BURN_N if dev.type != "cpu" else 128
    state = {"a": torch.randn(n, n, device=dev)}
    b = torch.randn(n, n, device=dev)

    def product() -> None:
        a = torch.mm(state["a"], b)
        state["a"] = a.div_(a.abs().max() + 1.0)  # keep the values finite
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        with products.get_lock():
            products.value += 1

    product()
    with ready.get_lock():
        ready.value += 1
    _duty_loop(stop, duty, period_s, product)


@dataclass(frozen=True)
class BurnSpec:
    """One interference setting."""

    n_procs: int
    """Burning processes (>= 0)."""
    duty: float = 1.0
    """Busy fraction of each period, in (0, 1]."""

    @property
    def intensity(self) -> float:
        """CPU demanded, in cores."""
        return self.n_procs * self.duty

    @classmethod
    def parse(cls, text: str) -> "BurnSpec":
        """'0', '2' (two processes at 100%) or '1x0.5' (one process at 50% duty)."""
        n, _, duty = text.partition("x")
        spec = cls(int(n), float(duty) if duty else 1.0)
        if spec.n_procs < 0 or not 0.0 < spec.duty <= 1.0:
            raise ValueError(f"burn spec {text!r}: need n_procs >= 0 and 0 < duty <= 1, e.g. '2' or '1x0.5'")
        return spec

    def label(self) -> str:
        return f"{self.n_procs}x{self.duty:g}"


def _stat_fields(pid: int, *indexes: int) -> list[int] | None:
    """Fields ``indexes`` of ``/proc/<pid>/stat`` counted from the state (the comm may hold spaces and
    parentheses), read once; None if the process is gone or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return [int(fields[i]) for i in indexes]
    except (OSError, ValueError, IndexError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all threads) so far (Linux /proc), or None."""
    got = _stat_fields(pid, 11, 12)
    return None if got is None else sum(got) / os.sysconf("SC_CLK_TCK")


def niceness_of(pid: int) -> int | None:
    """Niceness of process ``pid`` (Linux /proc), or None."""
    got = _stat_fields(pid, 16)
    return None if got is None else got[0]


class CpuBurner:
    """Start/stop ``n_procs`` CPU-burning processes; also a context manager."""

    kind = "cpu"

    def __init__(self, n_procs: int = 1, duty: float = 1.0, period_s: float = 0.02, nice: int | None = None,
                 cpus: tuple[int, ...] | None = None) -> None:
        """``nice``: the burners' niceness (absolute; None: the starting thread's). The replay's co-runner
        uses 0, a neighbour at the default priority whatever the load generator's (``slonn compare
        --client-nice``). Lowering it needs CAP_SYS_NICE: without it the burners keep their parent's, and
        :meth:`usage` reports the niceness they ran at. ``cpus``: the CPUs they may run on (None: the
        starting thread's), e.g. the one a pinned worker runs on (``python -m bench.adapt --pin``)."""
        if n_procs < 0 or not 0.0 < duty <= 1.0 or period_s <= 0:
            raise ValueError(f"CpuBurner(n_procs={n_procs}, duty={duty}, period_s={period_s}): "
                             "need n_procs >= 0, 0 < duty <= 1, period_s > 0")
        self.spec = BurnSpec(n_procs, duty)
        self.period_s = period_s
        self.nice = nice
        self.cpus = cpus
        self._ctx = mp.get_context("spawn")
        self._stop = None
        self._procs: list = []
        self.niceness: int | None = None
        """The burners' niceness while they ran (read at stop)."""
        self.cpu_s: float | None = None
        """CPU seconds the burners got between the last start() and stop()."""
        self.wall_s: float | None = None
        self._t0 = 0.0

    @property
    def intensity(self) -> float:
        return self.spec.intensity

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start(self) -> "CpuBurner":
        if self._procs:
            raise RuntimeError("CpuBurner already started")
        self.cpu_s, self.wall_s = None, None
        self._t0 = time.monotonic()
        self._stop = self._ctx.Event()
        for _ in range(self.spec.n_procs):
            p = self._ctx.Process(target=self._target(), daemon=True, args=self._args())
            p.start()
            self._procs.append(p)
        return self

    def _target(self):
        return _burn

    def _args(self) -> tuple:
        return self._stop, self.spec.duty, self.period_s, self.nice, self.cpus

    def _died(self) -> list[int]:
        """Exit codes of the burner processes that have ended (they should run until stop())."""
        return [p.exitcode for p in self._procs if p.exitcode is not None]

    def stop(self, timeout_s: float = 2.0) -> None:
        procs, self._procs = self._procs, []  # a second stop() (another thread's) finds nothing to do
        if procs:  # what it got, read before it exits: did it really take its cores?
            self.niceness = niceness_of(procs[0].pid)
            cpu = [cpu_seconds(p.pid) for p in procs]
            self.cpu_s = None if None in cpu else sum(cpu)
            self.wall_s = time.monotonic() - self._t0
        if self._stop is not None:
            self._stop.set()
        for p in procs:
            p.join(timeout_s)
            if p.is_alive():
                p.terminate()
                p.join(timeout_s)

    def usage(self) -> dict | None:
        """CPU the burners got over their last run (cores = CPU seconds / wall seconds; None on a system
        without /proc or before a stop)."""
        if self.cpu_s is None or not self.wall_s:
            return None
        return {"kind": self.kind, "cores": round(self.cpu_s / self.wall_s, 3), "asked_cores": self.intensity,
                "cpu_s": round(self.cpu_s, 2), "wall_s": round(self.wall_s, 2), "niceness": self.niceness}

    def __enter__(self) -> "CpuBurner":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class DeviceBurner(CpuBurner):
    """Start/stop ``n_procs`` processes that keep a torch device busy (``device``, e.g. "cuda:0"); the
    co-runner for a model served on a GPU. ``start()`` returns once every process has run its first
    product (a child's torch import and CUDA context take seconds, which would otherwise count as
    interference time). ``usage()`` reports the CPU its processes used (on a GPU, mostly the time they
    waited for their kernels) and how many products they ran."""

    kind = "device"

    def __init__(self, device: str, n_procs: int = 1, duty: float = 1.0, period_s: float = 0.02,
                 nice: int | None = None, cpus: tuple[int, ...] | None = None,
                 start_timeout_s: float = 120.0) -> None:
        super().__init__(n_procs, duty, period_s, nice, cpus)
        self.device = device
        self.start_timeout_s = start_timeout_s
        self._ready = self._ctx.Value("i", 0)
        self._products = self._ctx.Value("q", 0)

    def _target(self):
        return _burn_device

    def _args(self) -> tuple:
        return (*super()._args(), self.device, self._ready, self._products)

    def start(self) -> "DeviceBurner":
        self._ready.value = 0
        self._products.value = 0
        super().start()
        t_end = time.monotonic() + self.start_timeout_s
        while self._ready.value < self.spec.n_procs:
            died = self._died()
            if died or time.monotonic() > t_end:
                self.stop()
                raise RuntimeError(f"device burner on {self.device}: "
                                   + (f"a process exited with {died[0]} before its first product" if died
                                      else f"not burning after {self.start_timeout_s:.0f} s"))
            time.sleep(0.05)
        self._t0 = time.monotonic()  # interference starts now, not at the spawn
        return self

    @property
    def products(self) -> int:
        """Matrix products run since the last start()."""
        return self._products.value

    def usage(self) -> dict | None:
        got = super().usage()
        return None if got is None else {**got, "device": self.device, "products": self.products}


CORUNNER_DEVICES = ("auto", "cpu", "cuda")


def corunner_device(requested: str = "auto") -> str:
    """Where a co-runner should burn: "cuda" (GPU 0 by default, or "cuda:N") when asked, or with "auto" when
    this machine has a GPU (the model is then served there); else "cpu". Raises ValueError naming the
    value when CUDA is asked for and absent."""
    if requested == "cpu":
        return "cpu"
    import torch

    try:
        dev = torch.device("cuda" if requested == "auto" else requested)
    except RuntimeError:
        dev = None
    if dev is None or dev.type != "cuda":
        raise ValueError(f"corunner device {requested!r}: expected one of {list(CORUNNER_DEVICES)} or cuda:N")
    if not torch.cuda.is_available():
        if requested == "auto":
            return "cpu"
        raise ValueError(f"corunner device {requested!r}: CUDA is not available here; use 'cpu' or 'auto'")
    index = dev.index or 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"corunner device {requested!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return f"cuda:{index}"


def corunner_device_or_exit(parser, requested: str) -> str:
    """:func:`corunner_device`, or the parser's usage error naming ``--corunner-device``."""
    try:
        return corunner_device(requested)
    except ValueError as exc:
        parser.error(f"--corunner-device: {exc}")
        raise  # parser.error exits; this is for type checkers


def add_corunner_device_arg(p) -> None:
    """``--corunner-device`` on an argparse parser (slonn replay, compare, adapt)."""
    p.add_argument("--corunner-device", default="auto", metavar="DEVICE",
                   help="what the co-runner burns: cpu, cuda[:N] (matrix products on that GPU, a neighbour of "
                        "a model served there), or auto (default): the GPU when this machine has one, else cpu")


def make_burner(device: str, n_procs: int = 1, duty: float = 1.0, period_s: float = 0.02,
                nice: int | None = None, cpus: tuple[int, ...] | None = None) -> CpuBurner:
    """The co-runner for ``device`` (from :func:`corunner_device`): a :class:`CpuBurner` for "cpu", a
    :class:`DeviceBurner` for a GPU."""
    if device == "cpu":
        return CpuBurner(n_procs, duty, period_s, nice, cpus)
    return DeviceBurner(device, n_procs, duty, period_s, nice, cpus)
