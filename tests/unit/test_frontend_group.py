"""`slonn serve --frontends N`: the workers' split, the flag checks, each frontend's arguments, the shared port
and the CPU split of a group."""

from __future__ import annotations

import socket

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
