"""`slonn serve --frontends 2` on one loopback port: separate client connections reach both frontends, every
request is answered, a frontend killed outright is replaced, and the parent's stop ends every process of
the group."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slonn.policy.contention import descendants
from slonn.protos.client import AsyncSlonnClient
from slonn.scheduler.serverproc import CpuMeter, ServerProcess, child_pids, frontend_of
from slonn.scheduler.sweep import SWEEP_CLASS
from tests.serving import x

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc (Linux)")

CLASS = "relaxed"
MAX_CHANNELS = 32
"""The kernel hashes each connection to a frontend: 32 connections all on one of two frontends is a 2^-31
chance, so the loop below ends long before."""
PER_CHANNEL = 3


def free_port_pair() -> int:
    """A port p with p and p + 1 free (the two frontends' metrics ports)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", p + 1))
                except OSError:
                    continue
                return p
    raise RuntimeError("no two adjacent free ports")


def requests_by_frontend(metrics_base: int) -> list[float]:
    """slonn_requests_total (all outcomes) of each frontend, from its own metrics port."""
    out = []
    for port in (metrics_base, metrics_base + 1):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        out.append(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("slonn_requests_total{")))
    return out


def start_time(pid: int) -> str | None:
    """When ``pid`` started (to tell it from a later process with its number), or None once it has ended
    (gone, or a zombie waiting to be reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else fields[19]


def still_running(started: dict[int, str | None], within_s: float = 10.0) -> list[int]:
    """The processes of ``started`` (pid: start time) still running after up to ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        alive = [pid for pid, t in started.items() if t is not None and start_time(pid) == t]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


async def send_until_both_answer(target: str, metrics_base: int) -> tuple[list[str], list[float]]:
    """Open channels (one connection each) and send PER_CHANNEL requests on each until both frontends have
    counted requests; returns every request's outcome and the per-frontend counts."""
    outcomes: list[str] = []
    clients: list[AsyncSlonnClient] = []
    counts = requests_by_frontend(metrics_base)
    start = list(counts)
    try:
        while len(clients) < MAX_CHANNELS and not all(c > s for c, s in zip(counts, start)):
            client = AsyncSlonnClient(target, own_connection=True)
            clients.append(client)
            await client.wait_ready(60.0)
            health = health_pb2_grpc.HealthStub(client.channel)
            status = (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)).status
            assert status == health_pb2.HealthCheckResponse.SERVING  # from whichever frontend has the connection
            for i in range(PER_CHANNEL):
                try:
                    res = await client.infer("tiny", CLASS, x(len(outcomes)), timeout_s=60)
                    assert res.output.shape == (10,)
                    outcomes.append("OK")
                except grpc.aio.AioRpcError as exc:
                    outcomes.append(exc.code().name)
            counts = requests_by_frontend(metrics_base)
    finally:
        for client in clients:
            await client.close()
    return outcomes, [c - s for c, s in zip(counts, start)]


@pytest.fixture(scope="module")
def group(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frontends")
    classes = tmp / "classes.toml"
    classes.write_text("".join(f'[[class]]\nname = "{name}"\nlatency_ms = 20000\nmin_accuracy = 0.0\n'
                               f'on_late = "serve"\n' for name in (CLASS, SWEEP_CLASS)))
    metrics_base = free_port_pair()
    args = ["--model-dir", str(tiny_model_dir), "--classes", str(classes), "--frontends", "2", "--workers", "2",
            "--metrics-port", str(metrics_base), "--grace-s", "2", "--stats-interval-s", "0"]
    with ServerProcess(args, tmp / "serve.log", start_timeout_s=600) as srv:
        yield srv, metrics_base


def frontends(parent: int) -> list[int]:
    return [pid for pid in child_pids(parent) if frontend_of(pid) == parent]


def test_two_frontends_on_one_port_both_answer_and_every_request_is_answered(group):
    srv, metrics_base = group
    assert len(frontends(srv.proc.pid)) == 2
    outcomes, per_frontend = asyncio.run(send_until_both_answer(srv.target, metrics_base))
    assert outcomes and outcomes == ["OK"] * len(outcomes)  # every request answered, with a result
    assert all(n > 0 for n in per_frontend), per_frontend  # both frontends served some
    assert sum(per_frontend) == len(outcomes)  # and between them, each request exactly once


def test_a_frontend_killed_outright_is_replaced_and_the_group_serves_on(group):
    srv, metrics_base = group
    parent = srv.proc.pid
    survivor, victim = frontends(parent)
    left_behind = {pid: start_time(pid) for pid in descendants(victim)}  # its workers and learner
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        new = [pid for pid in frontends(parent) if pid not in (survivor, victim)]
        if new and f"(pid {new[0]}) serving" in srv.log_path.read_text():
            break
        time.sleep(1.0)
    else:
        pytest.fail(f"no new frontend serving; see {srv.log_path}")
    assert frontends(parent) == [survivor, new[0]]
    # What the killed frontend left is killed with its process group.
    assert still_running(left_behind, within_s=0.0) == []
    outcomes, per_frontend = asyncio.run(send_until_both_answer(srv.target, metrics_base))
    assert outcomes == ["OK"] * len(outcomes) and all(n > 0 for n in per_frontend), (outcomes, per_frontend)


def test_sweep_over_several_channels_counts_every_frontend_and_its_workers(group, tmp_path, tiny_model_dir):
    from slonn.scripts.cli import main as cli_main

    srv, metrics_base = group
    assert CpuMeter(srv.proc.pid).servers() == [srv.proc.pid, *frontends(srv.proc.pid)]
    before = sum(requests_by_frontend(metrics_base))
    out = tmp_path / "sweep.json"
    assert cli_main(["sweep", "--target", srv.target, "--server-pid", str(srv.proc.pid), "--model-dir",
                     str(tiny_model_dir), "--model", "tiny", "--channels", "4", "--rates", "40",
                     "--duration-s", "2", "--warmup-s", "0", "--deadline-ms", "20000", "--json", str(out)]) == 0
    points = json.loads(out.read_text())["points"]
    assert [p["transport"] for p in points] == ["unary", "stream"]
    assert sum(requests_by_frontend(metrics_base)) - before == sum(p["sent"] for p in points)
    for p in points:
        assert p["errors"] == {} and p["unanswered"] == 0
        # The parent alone uses next to no CPU: the server column is the frontends', the worker column theirs.
        assert p["server_cpu_ms"] > 0 and p["worker_cpu_ms"] > 0


def test_stopping_the_parent_ends_every_process_of_the_group(group):
    srv, _ = group
    tree = {pid: start_time(pid) for pid in descendants(srv.proc.pid)}
    assert len(tree) >= 4  # two frontends, each with at least a worker
    assert srv.stop() == 0
    assert still_running(tree) == []


def test_a_frontend_that_cannot_start_stops_the_group_with_exit_1(tmp_path):
    cmd = [sys.executable, "-m", "slonn.scripts.cli", "serve", "--host", "127.0.0.1", "--port", "0",
           "--model-dir", str(tmp_path / "no-model"), "--frontends", "2", "--workers", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "slonn listening" not in done.stdout
    assert "before it served; stopping every frontend" in done.stderr
