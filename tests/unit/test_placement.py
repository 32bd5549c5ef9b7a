"""Where a worker runs: `slonn serve --worker-nice`, `--cpus`, `--worker-cpus` (workers/placement.py)."""

from __future__ import annotations

import argparse
import os

import pytest

from bench.adapt import split_cpus, started_workers
from slonn.scheduler.config import ServerConfig, SLOClassConfig
from slonn.scripts.serve import add_server_args, cpus_arg
from slonn.workers.placement import parse_cpus, set_cpus
from slonn.workers.pool import READY_LOG

CLASSES = {"c": SLOClassConfig("c", latency_ms=10)}


@pytest.mark.parametrize(("text", "cpus"), [("1", (1,)), ("0,2", (0, 2)), ("0-3", (0, 1, 2, 3)), ("3,0-1", (0, 1, 3))])
def test_cpu_lists_parse_to_sorted_cpu_numbers(text, cpus):
    assert parse_cpus(text) == cpus


@pytest.mark.parametrize("bad", ["", "a", "1-", "-1", "3-1", "0,,1"])
def test_a_bad_cpu_list_is_rejected_naming_the_text_and_the_flag(bad):
    with pytest.raises(ValueError, match="cpus"):
        parse_cpus(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="expected CPU numbers"):
        cpus_arg(bad)


def test_set_cpus_without_cpus_leaves_the_affinity_and_reports_it():
    assert set_cpus(None) == tuple(sorted(os.sched_getaffinity(0)))


def test_set_cpus_on_a_cpu_this_machine_lacks_raises_naming_it_and_changes_nothing():
    before = os.sched_getaffinity(0)
    with pytest.raises(ValueError, match="4095"):
        set_cpus((4095,))
    with pytest.raises(ValueError, match="only"):  # a list the kernel would quietly narrow
        set_cpus((min(before), 4095))
    assert os.sched_getaffinity(0) == before


def test_serve_refuses_cpus_it_cannot_run_on_naming_the_flag():
    from slonn.scripts.serve import placement_problem

    here = tuple(sorted(os.sched_getaffinity(0)))
    assert placement_problem(None, None) is None and placement_problem(here[:1], here[-1:]) is None
    assert "--worker-cpus" in placement_problem(here[:1], (4095,))
    assert "--cpus" in placement_problem((4095,), here)
    assert os.sched_getaffinity(0) == set(here)  # checked on a thread of its own


def test_serve_flags_reach_the_config():
    from slonn.scripts.serve import config_from_args

    p = argparse.ArgumentParser()
    add_server_args(p)
    args = p.parse_args(["--worker-nice", "5", "--worker-cpus", "0", "--cpus", "0", "--refit-overrun-share", "1",
                         "--refit-contention-shift", "inf"])
    cfg = config_from_args(args)
    assert (cfg.worker_nice, cfg.worker_cpus, args.cpus, cfg.refit_overrun_share, cfg.refit_contention_shift) \
        == (5, (0,), (0,), 1.0, float("inf"))
    default = config_from_args(p.parse_args([]))
    assert default.worker_cpus is None and default.refit_overrun_share == 0.2
    assert default.refit_contention_shift == 0.5


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"refit_overrun_share": 0.0}, "refit_overrun_share"),
    ({"refit_overrun_share": 1.5}, "refit_overrun_share"),
    ({"refit_contention_shift": 0.0}, "refit_contention_shift"),
    ({"refit_contention_shift": float("nan")}, "refit_contention_shift"),
    ({"worker_nice": 20}, "worker_nice"),
    ({"worker_nice": 1.5}, "worker_nice"),
    ({"worker_nice": True}, "worker_nice"),
    ({"worker_nice": 0, "in_process": True}, "worker_nice"),
    ({"worker_cpus": (os.cpu_count() or 1,)}, "worker_cpus"),
    ({"worker_cpus": ()}, "worker_cpus"),
    ({"worker_cpus": (0,), "in_process": True}, "worker_cpus"),
])
def test_bad_placement_is_rejected_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ServerConfig(model_dirs=("m",), classes=CLASSES, **kwargs)


def test_adapt_pins_the_model_to_the_last_cpu_and_reads_back_what_the_workers_ran_at(tmp_path):
    assert split_cpus([0, 1]) == ((0,), (1,)) and split_cpus([0, 1, 2, 3]) == ((0, 1, 2), (3,))
    assert split_cpus([0]) is None  # nothing to split
    log = tmp_path / "server.log"
    # The line workers.pool logs when a worker is up, in the pool's own format.
    log.write_text("2026-12-01 23:00:00,000 workers.pool INFO " + READY_LOG % (0, 12, "cpu", 0, "1", {}) + "\n"
                   + READY_LOG % (1, 13, "cuda:0", -10, "0,1,2", {"m": {"1": {"0.1": "gather"}}}) + "\n")
    assert started_workers(log) == [{"niceness": 0, "cpus": [1]}, {"niceness": -10, "cpus": [0, 1, 2]}]
