"""`slonn serve --frontends N`: N server processes on one port, started, watched and stopped by one parent.

Each frontend is a whole slonn server (its own event loop, scheduler, queues, latency learner and share of
the workers) bound to the same gRPC port, and HTTP port if any, with SO_REUSEPORT: the kernel hands each
new connection to one of them. The parent binds the ports first (so port 0 becomes one port for all),
starts the frontends, prints the ports once every frontend serves, forwards SIGTERM/SIGINT, and replaces a
frontend that ends: at once after it served a minute or more, else (it ended before it served, or soon
after) after 1 s, then 2 s, 4 s, ... up to a minute while its replacements keep ending, the others serving on
meanwhile. Only a frontend's first start is fatal: when it fails, the group stops (exit 1), since the same
start would fail again. Each frontend asks the kernel to send it SIGTERM when the parent dies, so no
frontend outlives it, and what is left of a frontend's process group when it ends (a worker, its learner)
is killed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

FRONTEND_ENV = "SLONN_FRONTEND"
"""Set by the parent in each frontend's environment: "<index>:<parent pid>"."""
LISTENING = "slonn listening on "
HTTP_LISTENING = "slonn HTTP listening on "
FRONTENDS_LINE = "slonn frontends: "
"""What the parent prints before its listening line: the number of frontends and their pids."""
STOP_MARGIN_S = 60.0
"""After a frontend's own drain time (--grace-s): how long the parent waits for it to exit before SIGKILL."""
RESPAWN_FIRST_S = 1.0
RESPAWN_MAX_S = 60.0
"""A frontend that keeps ending is started again after 1 s, then twice as long each time, at most this."""
STABLE_S = 60.0
"""A frontend that served this long before it ended was healthy: it is replaced at once, its backoff reset;
one that ended sooner (or before it served) is replaced after the backoff."""
_PR_SET_PDEATHSIG = 1


def split_workers(workers: int, frontends: int) -> list[int]:
    """``--workers`` shared out over ``--frontends``: as evenly as possible, the first ones one more.
    ValueError naming the flags when a frontend would have no worker."""
    if frontends < 1:
        raise ValueError(f"--frontends {frontends}: must be >= 1")
    if workers < frontends:
        raise ValueError(f"--workers {workers} is fewer than --frontends {frontends}: each frontend needs a "
                         f"worker of its own (--workers >= --frontends)")
    return [workers // frontends + (i < workers % frontends) for i in range(frontends)]


def identity(environ: dict[str, str] | None = None) -> tuple[int, int] | None:
    """(index, parent pid) of this process as a frontend of a group, or None when it serves alone."""
    value = (os.environ if environ is None else environ).get(FRONTEND_ENV)
    if not value:
        return None
    index, parent = value.split(":")
    return int(index), int(parent)


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel send this process SIGTERM (a drain) when ``parent_pid`` ends; exit at once if it
    already has (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT and not listening: it holds the port (port 0: a free
    one) for the frontends to bind with SO_REUSEPORT too, and receives no connection itself. OSError when
    the port is taken by a process that does not share it."""
    family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def frontend_argv(argv: list[str], port: int, workers: int, http_port: int | None, metrics_port: int) -> list[str]:
    """One frontend's `slonn serve` arguments: the group's, with its port, share of the workers and metrics
    port after them (argparse keeps the last value of a flag)."""
    out = [*argv, "--frontends", "1", "--port", str(port), "--workers", str(workers),
           "--metrics-port", str(metrics_port)]
    if http_port is not None:
        out += ["--http-port", str(http_port)]
    return out


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of an ended frontend's process group (a worker or learner process that outlived
    a frontend killed outright)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class _Frontend:
    index: int
    argv: list[str]
    proc: subprocess.Popen | None = None
    ready: bool = False
    ready_at: float | None = None
    """When its current process started serving (time.monotonic)."""
    starts: int = 0
    failures: int = 0
    """Its processes that ended in a row without serving STABLE_S (or could not be started)."""
    respawn_at: float | None = None
    """When it is started again (time.monotonic); None: running, or not started yet."""
    _buffer: bytes = field(default=b"", repr=False)


class FrontendGroup:
    """The parent of N frontends. ``run()`` returns the exit code: 0 after a requested stop that every
    frontend ended cleanly, 1 after a frontend failed to start or ended with an error while stopping."""

    def __init__(self, argv: list[str], frontends: int, workers: int, host: str, port: int,
                 http_port: int | None, metrics_port: int, grace_s: float, respawn_first_s: float = RESPAWN_FIRST_S,
                 respawn_max_s: float = RESPAWN_MAX_S, stable_s: float = STABLE_S) -> None:
        self.respawn_first_s, self.respawn_max_s, self.stable_s = respawn_first_s, respawn_max_s, stable_s
        self.shares = split_workers(workers, frontends)
        self.argv = argv
        self.host = host
        self.port = port
        self.http_port = http_port
        self.metrics_port = metrics_port
        self.grace_s = grace_s
        self.frontends: list[_Frontend] = []
        self._stop_signal: int | None = None
        self._sel = selectors.DefaultSelector()

    def _command(self, f: _Frontend) -> tuple[list[str], dict[str, str]]:
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        cmd = [sys.executable, "-m", "slonn.scripts.cli", "--log-level", str(level), "serve", *f.argv]
        env = {**os.environ, FRONTEND_ENV: f"{f.index}:{os.getpid()}", "PYTHONUNBUFFERED": "1"}
        return cmd, env

    def _spawn(self, f: _Frontend) -> None:
        # From the main thread only: the kernel's parent-death signal follows the thread that forked.
        cmd, env = self._command(f)
        # A session (and process group) of its own: whatever it leaves behind when it ends is killed with its
        # group, and a terminal's Ctrl-C reaches the parent only, which passes it on.
        f.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, start_new_session=True)
        f.ready, f.ready_at, f._buffer = False, None, b""
        f.starts += 1
        os.set_blocking(f.proc.stdout.fileno(), False)
        self._sel.register(f.proc.stdout, selectors.EVENT_READ, f)
        log.info("frontend %d: started (pid %d, %d worker(s))", f.index, f.proc.pid, self.shares[f.index])

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def run(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        held: list[socket.socket] = []
        try:
            held.append(reserve_port(self.host, self.port))
            port = held[0].getsockname()[1]
            http_port = None
            if self.http_port is not None:
                held.append(reserve_port(self.host, self.http_port))
                http_port = held[1].getsockname()[1]
            self.frontends = [
                _Frontend(i, frontend_argv(self.argv, port, share, http_port,
                                           self.metrics_port + i if self.metrics_port else 0))
                for i, share in enumerate(self.shares)]
            for f in self.frontends:
                self._spawn(f)
            return self._watch(port, http_port)
        finally:
            for sock in held:
                sock.close()
            for s, handler in old.items():
                signal.signal(s, handler)

    def _watch(self, port: int, http_port: int | None) -> int:
        announced = False
        while self._stop_signal is None:
            for key, _ in self._sel.select(timeout=0.2):
                self._read(key.data)
            if not announced and all(f.ready for f in self.frontends):
                announced = True
                pids = ", ".join(str(f.proc.pid) for f in self.frontends)
                print(f"{FRONTENDS_LINE}{len(self.frontends)} (pids {pids})", flush=True)
                print(f"{LISTENING}{self.host}:{port}", flush=True)
                if http_port is not None:
                    print(f"{HTTP_LISTENING}{self.host}:{http_port}", flush=True)
            now = time.monotonic()
            for f in self.frontends:
                if f.respawn_at is not None:
                    if now >= f.respawn_at:
                        self._respawn(f)
                    continue
                code = f.proc.poll()
                if code is None:
                    continue
                self._read(f)
                self._sel.unregister(f.proc.stdout)
                f.proc.stdout.close()
                _kill_group(f.proc.pid)
                if self._stop_signal is not None:  # it saw the signal first (Ctrl-C reaches the whole group)
                    break
                if not f.ready and f.starts == 1:
                    log.error("frontend %d (pid %d) exited with code %d before it served; stopping every "
                              "frontend", f.index, f.proc.pid, code)
                    self._stop_all()
                    return 1
                self._ended(f, code, now)
        log.info("signal %d: stopping %d frontend(s)", self._stop_signal, len(self.frontends))
        return self._stop_all()

    def _ended(self, f: _Frontend, code: int, now: float) -> None:
        """A frontend that has started before ended: start it again, at once if it had served STABLE_S, else
        after a delay that doubles with each such end in a row (the others serve on meanwhile)."""
        served_s = 0.0 if f.ready_at is None else now - f.ready_at
        delay = self._retry_later(f, now, healthy=served_s >= self.stable_s)
        how = f"after serving {served_s:.0f} s" if f.ready else "before it served"
        log.error("frontend %d (pid %d) exited with code %d %s; its connections' clients reconnect to the other "
                  "frontends; starting a new one in %.2f s", f.index, f.proc.pid, code, how, delay)

    def _retry_later(self, f: _Frontend, now: float, healthy: bool) -> float:
        """Schedule ``f``'s next start: at once after a healthy run, else after 1 s, 2 s, 4 s, ... (the n-th
        unhealthy end in a row), at most the maximum. Returns the delay."""
        if healthy:
            f.failures, delay = 0, 0.0
        else:
            delay = min(self.respawn_first_s * 2 ** f.failures, self.respawn_max_s)
            f.failures += 1
        f.respawn_at = now + delay
        return delay

    def _respawn(self, f: _Frontend) -> None:
        f.respawn_at, f.ready, f.ready_at = None, False, None
        try:
            self._spawn(f)
        except OSError as exc:  # e.g. out of processes: try again later, as after a start that failed
            delay = self._retry_later(f, time.monotonic(), healthy=False)
            log.error("frontend %d: could not start a process (%s); trying again in %.2f s", f.index, exc, delay)

    def _read(self, f: _Frontend) -> None:
        """Take the frontend's stdout: its listening line marks it ready; other lines are passed on."""
        try:
            chunk = f.proc.stdout.read()
        except (OSError, ValueError):
            return
        if not chunk:
            return
        f._buffer += chunk
        *lines, f._buffer = f._buffer.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            if line.startswith(LISTENING):
                f.ready, f.ready_at = True, time.monotonic()
                log.info("frontend %d (pid %d) serving", f.index, f.proc.pid)
            elif not line.startswith(HTTP_LISTENING):
                print(line, flush=True)

    def _stop_all(self) -> int:
        """SIGTERM every running frontend (each drains for its --grace-s), SIGKILL what is left after the
        margin; 0 if every one ended with 0."""
        running = [f.proc for f in self.frontends if f.proc is not None and f.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s + STOP_MARGIN_S
        codes = []
        for proc in running:
            try:
                codes.append(proc.wait(max(deadline - time.monotonic(), 0.0)))
            except subprocess.TimeoutExpired:
                log.error("frontend pid %d still running %.0f s after SIGTERM: killed", proc.pid,
                          self.grace_s + STOP_MARGIN_S)
                proc.kill()
                codes.append(proc.wait())
            _kill_group(proc.pid)
        for f in self.frontends:
            if f.proc is not None and f.proc.stdout is not None and not f.proc.stdout.closed:
                f.proc.stdout.close()
        return 0 if all(c == 0 for c in codes) else 1
