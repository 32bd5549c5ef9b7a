"""Start `slonn serve` as a child process on a free loopback port; stop it with SIGTERM. Plus the /proc
readers that find the processes it started and the CPU they use."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from slonn.scheduler.frontends import FRONTEND_ENV


class ServerProcess:
    """``with ServerProcess([...serve args]) as srv: srv.target`` -> "127.0.0.1:PORT"."""

    def __init__(self, serve_args: list[str], log_path: Path, start_timeout_s: float = 600.0,
                 cwd: Path | None = None) -> None:
        self.serve_args = serve_args
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.cwd = cwd
        """Working directory of the server: a checkout there is the slonn it imports (cwd comes first on
        ``sys.path`` with ``python -m``), so two versions can be measured side by side."""
        self.target = ""
        self.returncode: int | None = None

    def __enter__(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "slonn.scripts.cli", "serve", "--host", "127.0.0.1", "--port", "0", *self.serve_args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=self.cwd)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("slonn listening on "):
                self.target = line.split()[-1]
                return self
        self.stop()
        raise RuntimeError(f"server did not start; see {self.log_path}:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        self._log.close()
        return self.returncode

    def __exit__(self, *exc) -> None:
        self.stop()


def child_pids(pid: int, all_threads: bool = False) -> list[int]:
    """Children of ``pid`` (Linux /proc): those its main thread started, or with ``all_threads`` those any of
    its threads started (the server's learner spawns its fit process from a thread of its own)."""
    tids = [str(pid)]
    if all_threads:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return []
    out = []
    for tid in tids:
        try:
            out += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return out


def frontend_of(pid: int) -> int | None:
    """The pid of the `slonn serve --frontends N` parent that started ``pid`` as one of its frontends, else
    None (from the environment it was started with, /proc/PID/environ)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = f"{FRONTEND_ENV}=".encode()
    value = next((v[len(prefix):] for v in environ if v.startswith(prefix)), None)
    try:
        return None if value is None else int(value.split(b":")[1])
    except (IndexError, ValueError):
        return None


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all threads), 0.0 if it is gone."""
    from slonn.workers.corunner import cpu_seconds

    cpu = cpu_seconds(pid)
    return 0.0 if cpu is None else cpu


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds a process and its children used between two :meth:`CpuMeter.read` calls."""

    server_s: float
    """The server process; for `slonn serve --frontends N`, the parent and every frontend."""
    children_s: float
    """Workers and the learner's fit process: children started by any of the server's threads (of any
    frontend's)."""

    def per_request_ms(self, n: int) -> dict[str, float | None]:
        if n <= 0:
            return {"server_cpu_ms": None, "worker_cpu_ms": None}
        return {"server_cpu_ms": round(self.server_s / n * 1e3, 4),
                "worker_cpu_ms": round(self.children_s / n * 1e3, 4)}


class CpuMeter:
    """CPU used by a server process and its children over a window (Linux /proc).

    ``read()`` takes a snapshot; ``since(snapshot)`` is the use from then to now. A child started inside the
    window counts from zero; one that exited inside it loses what it used since the snapshot (/proc no longer
    has it), which only undercounts a worker that died mid-window.
    """

    def __init__(self, pid: int, cpu_of: Callable[[int], float] = process_cpu_s,
                 children_of: Callable[[int], list[int]] = lambda pid: child_pids(pid, all_threads=True),
                 parent_of_frontend: Callable[[int], int | None] = frontend_of) -> None:
        self.pid = pid
        self._cpu_of = cpu_of
        self._children_of = children_of
        self._parent_of_frontend = parent_of_frontend

    def servers(self) -> list[int]:
        """The server processes: ``pid``, and when it is a `slonn serve --frontends N` parent, its frontends."""
        return [self.pid, *(c for c in self._children_of(self.pid) if self._parent_of_frontend(c) == self.pid)]

    def read(self) -> dict[int, float]:
        """{pid: CPU seconds so far} for the server process(es) and each of their children."""
        servers = self.servers()
        below = [c for s in servers for c in self._children_of(s) if c not in servers]
        return {pid: self._cpu_of(pid) for pid in (*servers, *below)}

    def since(self, before: dict[int, float]) -> CpuUse:
        servers = set(self.servers())
        used = {pid: max(cpu - before.get(pid, 0.0), 0.0) for pid, cpu in self.read().items()}
        return CpuUse(sum(u for pid, u in used.items() if pid in servers),
                      sum(u for pid, u in used.items() if pid not in servers))
