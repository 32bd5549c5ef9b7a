"""A worker's wait for its next task: polled for a while, then blocking; every message arrives, in order."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest

from slonn.scheduler.config import ServerConfig, SLOClassConfig
from slonn.workers.process import wait_for_task


@pytest.mark.parametrize("spin_s", [0.0, 0.005, 1.0])
def test_messages_sent_before_during_and_after_the_spin_all_arrive_in_order(spin_s):
    ours, theirs = mp.Pipe()
    theirs.send("ready")  # already waiting: returned without spinning
    assert wait_for_task(ours, spin_s) == "ready"

    def later():
        time.sleep(0.03)  # after a 5 ms spin (blocking recv), within a 1 s one (seen by the poll)
        theirs.send("later")
        theirs.send("next")

    t = threading.Thread(target=later)
    t.start()
    assert wait_for_task(ours, spin_s) == "later"
    assert wait_for_task(ours, spin_s) == "next"
    t.join()


def test_a_closed_pipe_ends_the_wait_with_eof():
    ours, theirs = mp.Pipe()
    theirs.close()
    with pytest.raises(EOFError):
        wait_for_task(ours, 0.01)


def test_negative_spin_is_rejected_naming_the_field():
    with pytest.raises(ValueError, match="worker_spin_ms"):
        ServerConfig(model_dirs=("m",), classes={"c": SLOClassConfig("c", latency_ms=10)}, worker_spin_ms=-1)


def test_spin_flag_rejects_negative_and_non_finite_values_naming_the_flag():
    import argparse

    from slonn.scripts.serve import spin_ms

    assert spin_ms("20") == 20.0
    for bad in ("-1", "nan", "inf", "fast"):
        with pytest.raises(argparse.ArgumentTypeError, match="--worker-spin-ms"):
            spin_ms(bad)


def test_spin_without_worker_processes_is_rejected():
    with pytest.raises(ValueError, match="worker_spin_ms"):
        ServerConfig(model_dirs=("m",), classes={"c": SLOClassConfig("c", latency_ms=10)}, worker_spin_ms=5,
                     in_process=True)
