"""`slonn serve --nice`: the niceness the server and its workers run at."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from slonn.scripts import serve


def test_nice_adds_to_the_process_niceness_and_children_inherit_it():
    # In a child process: niceness only goes up without privilege, and the test runner must not change.
    code = ("import os, subprocess, sys; from slonn.scripts.serve import apply_nice; before = os.nice(0); "
            "after = apply_nice(3); child = subprocess.run([sys.executable, '-c', 'import os; print(os.nice(0))'], "
            "capture_output=True, text=True).stdout.strip(); print(before, after, child)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, after, child = map(int, out)
    assert after == before + 3 and child == after


def test_a_refused_priority_raise_warns_and_keeps_the_niceness(monkeypatch, caplog):
    def refuse(which, who, value):
        raise PermissionError("no CAP_SYS_NICE")

    before = serve.os.getpriority(serve.os.PRIO_PROCESS, 0)
    monkeypatch.setattr(serve.os, "setpriority", refuse)
    with caplog.at_level(logging.WARNING):
        assert serve.apply_nice(-10) == before
    assert "--nice -10" in caplog.text and "CAP_SYS_NICE" in caplog.text


def test_call_at_niceness_runs_on_a_thread_at_that_niceness_and_leaves_the_caller_alone():
    import os
    import threading

    before = os.getpriority(os.PRIO_PROCESS, 0)
    target = min(before + 4, 19)  # raising the niceness value needs no privilege
    seen = {}

    def fn():
        seen["thread"] = threading.current_thread() is not threading.main_thread()
        seen["inside"] = os.getpriority(os.PRIO_PROCESS, 0)
        return "done"

    assert serve.call_at_niceness(fn, target) == ("done", target)
    assert seen == {"thread": True, "inside": target}
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # nothing to undo in the caller's thread


def test_call_at_niceness_reraises_in_the_caller():
    def boom():
        raise KeyError("x")

    with pytest.raises(KeyError):
        serve.call_at_niceness(boom, None)


def test_call_at_niceness_refused_warns_and_runs(monkeypatch, caplog):
    def refuse(which, who, value):
        raise PermissionError("no CAP_SYS_NICE")

    monkeypatch.setattr(serve.os, "setpriority", refuse)
    with caplog.at_level(logging.WARNING):
        result, nice = serve.call_at_niceness(lambda: 7, -5)
    assert result == 7 and nice == serve.os.getpriority(serve.os.PRIO_PROCESS, 0)
    assert "CAP_SYS_NICE" in caplog.text
