"""Start `slonn serve` as a child process on a free loopback port; stop it with SIGTERM. Plus the /proc
reader that finds the processes it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class ServerProcess:
    """``with ServerProcess([...serve args]) as srv: srv.target`` -> "127.0.0.1:PORT"."""

    def __init__(self, serve_args: list[str], log_path: Path, start_timeout_s: float = 600.0) -> None:
        self.serve_args = serve_args
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.target = ""
        self.returncode: int | None = None

    def __enter__(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "slonn.scripts.cli", "serve", "--host", "127.0.0.1", "--port", "0", *self.serve_args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
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
