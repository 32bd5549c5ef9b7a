"""`slonn serve --frontends N`: the workers' split, the flag checks, each frontend's arguments, the shared port,
the CPU split of a group, and the parent's supervision (with stand-in frontends)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time

import pytest

from slonn.scheduler import frontends
from slonn.scheduler.frontends import frontend_argv, identity, reserve_port, split_workers
from slonn.scheduler.serverproc import CpuMeter
from slonn.scripts import serve


@pytest.mark.parametrize("workers,n,shares", [(1, 1, [1]), (2, 2, [1, 1]), (5, 2, [3, 2]), (7, 3, [3, 2, 2]),
                                              (4, 4, [1, 1, 1, 1])])
def test_workers_are_shared_out_evenly_and_all_of_them(workers, n, shares):
    got = split_workers(workers, n)
    assert got == shares
    assert sum(got) == workers and min(got) >= 1


def test_fewer_workers_than_frontends_is_an_error_naming_both_flags():
    with pytest.raises(ValueError, match=r"--workers 1 is fewer than --frontends 2"):
        split_workers(1, 2)
    with pytest.raises(ValueError, match=r"--frontends 0: must be >= 1"):
        split_workers(4, 0)


@pytest.mark.parametrize("argv,message", [
    (["--frontends", "3", "--workers", "2"], "--workers 2 is fewer than --frontends 3"),
    (["--frontends", "0"], "--frontends 0: must be >= 1"),
    (["--frontends", "2", "--workers", "2", "--pool", "ray"], "--pool ray needs --ray-address"),
])
def test_serve_refuses_frontends_it_cannot_run_with_exit_2_naming_the_flag(argv, message, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    assert serve.main(["--model-dir", str(model), *argv]) == 2
    assert message in capsys.readouterr().err


def test_each_frontend_gets_the_group_port_its_workers_and_metrics_port_after_the_group_flags():
    group = ["--model-dir", "m", "--frontends", "2", "--workers", "5", "--port", "0", "--metrics-port", "9000"]
    argv = frontend_argv(group, 41000, 2, http_port=41001, metrics_port=9001)
    args = serve_parser().parse_args(argv)
    assert (args.frontends, args.port, args.workers, args.metrics_port, args.http_port) == (1, 41000, 2, 9001, 41001)
    assert args.model_dir == [serve.Path("m")]
    assert "--http-port" not in frontend_argv(group, 41000, 2, http_port=None, metrics_port=0)


def serve_parser():
    import argparse

    p = argparse.ArgumentParser()
    serve.add_server_args(p)
    return p


def test_identity_reads_index_and_parent_from_the_environment():
    assert identity({}) is None
    assert identity({frontends.FRONTEND_ENV: "1:4242"}) == (1, 4242)


def test_the_reserved_port_can_be_bound_again_with_so_reuseport_and_takes_no_connection():
    held = reserve_port("127.0.0.1", 0)
    port = held.getsockname()[1]
    assert port > 0
    other = socket.socket()
    try:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", port))  # what each frontend does
        with pytest.raises(ConnectionRefusedError):  # nobody listens yet: the held socket answers nothing
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        other.close()
        held.close()


def test_a_port_taken_without_so_reuseport_cannot_be_reserved():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(OSError):
            reserve_port("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def test_cpu_meter_of_a_group_counts_every_frontend_as_server_and_their_workers_as_children():
    # 1: the parent; 2, 3: its frontends; 20, 30: their workers.
    tree = {1: [2, 3], 2: [20], 3: [30], 20: [], 30: []}
    cpu = {1: 0.1, 2: 10.0, 3: 20.0, 20: 5.0, 30: 6.0}
    meter = CpuMeter(1, cpu_of=lambda pid: cpu[pid], children_of=lambda pid: list(tree[pid]),
                     parent_of_frontend=lambda pid: 1 if pid in (2, 3) else None)
    before = meter.read()
    assert sorted(before) == [1, 2, 3, 20, 30]
    cpu.update({1: 0.2, 2: 11.0, 3: 22.0, 20: 5.5, 30: 6.25})
    use = meter.since(before)
    assert use.server_s == pytest.approx(0.1 + 1.0 + 2.0)
    assert use.children_s == pytest.approx(0.5 + 0.25)


def test_cpu_meter_of_a_lone_server_keeps_its_children_as_workers():
    tree = {1: [2], 2: []}
    cpu = {1: 1.0, 2: 1.0}
    meter = CpuMeter(1, cpu_of=lambda pid: cpu[pid], children_of=lambda pid: list(tree[pid]),
                     parent_of_frontend=lambda pid: None)
    before = meter.read()
    cpu.update({1: 2.0, 2: 4.0})
    use = meter.since(before)
    assert (use.server_s, use.children_s) == (pytest.approx(1.0), pytest.approx(3.0))


FAKE_FRONTEND = r"""
import os, signal, sys, time
index, attempts, plan = int(sys.argv[1]), sys.argv[2], sys.argv[3]
n = len([f for f in os.listdir(attempts) if f.startswith(f"{index}-")])  # this frontend's earlier starts
open(os.path.join(attempts, f"{index}-{n}"), "w").close()
what = plan.split(",")[index].split("/")
what = what[min(n, len(what) - 1)]  # its n-th start: "serve", "crash" (serve, then exit 3) or "fail" (exit 4)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
if what == "fail":
    sys.exit(4)
print("slonn listening on 127.0.0.1:1", flush=True)
if what == "crash":
    sys.exit(3)
time.sleep(120)  # bounded: the test stops the group long before
"""


def fake_group(tmp_path, plan: str, frontends_n: int = 2) -> frontends.FrontendGroup:
    """A group whose frontends are stand-ins that serve, crash or fail to start as ``plan`` says: one entry per
    frontend (comma-separated), one word per start (slash-separated, the last repeated)."""
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    group = frontends.FrontendGroup([], frontends_n, frontends_n, "127.0.0.1", 0, None, 0, grace_s=1.0,
                                    respawn_first_s=0.05, respawn_max_s=0.2)
    group._command = lambda f: ([sys.executable, "-c", FAKE_FRONTEND, str(f.index), str(attempts), plan],
                                dict(os.environ))
    return group


def starts(tmp_path, index: int) -> int:
    return len([f for f in os.listdir(tmp_path / "attempts") if f.startswith(f"{index}-")])


def stop_when(group, predicate, timeout_s: float = 60.0) -> threading.Thread:
    """Stop ``group`` (as SIGTERM would) once ``predicate()`` holds, or after ``timeout_s``."""
    def watch():
        deadline = time.monotonic() + timeout_s
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.02)
        group._stop_signal = signal.SIGTERM

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_replacement_that_fails_to_start_is_retried_with_backoff_while_the_others_serve(tmp_path, caplog):
    # Frontend 0 serves; frontend 1 serves, crashes at once, and then never starts again.
    group = fake_group(tmp_path, "serve,crash/fail")
    watcher = stop_when(group, lambda: starts(tmp_path, 1) >= 5 and group.frontends[0].ready)
    with caplog.at_level(logging.INFO, logger="slonn.scheduler.frontends"):
        group.run()
    watcher.join()
    assert starts(tmp_path, 1) >= 5, "frontend 1 was not retried"
    assert starts(tmp_path, 0) == 1  # the healthy frontend was never stopped or replaced...
    assert group.frontends[0].proc.returncode == 0  # ...and ran until the group's stop (its SIGTERM: exit 0)
    delays = [r.args[-1] for r in caplog.records if "starting a new one in" in r.msg]
    assert delays[:4] == [0.05, 0.1, 0.2, 0.2]  # doubling from the first delay, capped; also after the crash
    assert "after serving" in caplog.text and "before it served" in caplog.text
    assert "stopping every frontend" not in caplog.text


def test_a_frontend_whose_first_start_fails_stops_the_group(tmp_path, caplog):
    group = fake_group(tmp_path, "serve,fail")
    finished = threading.Event()
    watcher = stop_when(group, finished.is_set)  # only a bound: the group stops by itself
    with caplog.at_level(logging.INFO, logger="slonn.scheduler.frontends"):
        code = group.run()
    finished.set()
    watcher.join()
    assert code == 1 and starts(tmp_path, 1) == 1
    assert "before it served; stopping every frontend" in caplog.text
    assert group.frontends[0].proc.returncode is not None  # the other frontend was stopped with it
