"""`slonn serve --nice`: the niceness the server and its workers run at."""

from __future__ import annotations

import logging
import subprocess
import sys

from scripts import serve


def test_nice_adds_to_the_process_niceness_and_children_inherit_it():
    # In a child process: niceness only goes up without privilege, and the test runner must not change.
    code = ("import os, subprocess, sys; from scripts.serve import apply_nice; before = os.nice(0); "
            "after = apply_nice(3); child = subprocess.run([sys.executable, '-c', 'import os; print(os.nice(0))'], "
            "capture_output=True, text=True).stdout.strip(); print(before, after, child)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, after, child = map(int, out)
    assert after == before + 3 and child == after


def test_a_refused_priority_raise_warns_and_keeps_the_niceness(monkeypatch, caplog):
    def refuse(increment):
        if increment < 0:
            raise PermissionError("no CAP_SYS_NICE")
        return 5

    monkeypatch.setattr(serve.os, "nice", refuse)
    with caplog.at_level(logging.WARNING):
        assert serve.apply_nice(-10) == 5
    assert "--nice -10" in caplog.text and "CAP_SYS_NICE" in caplog.text


def test_niceness_sets_the_block_and_goes_back():
    # In a child process, so the test runner's niceness never changes; going back up needs no privilege
    # when the block raised the niceness value, which is what this does.
    code = ("import os; from scripts.serve import niceness; before = os.getpriority(os.PRIO_PROCESS, 0)\n"
            "with niceness(before + 4):\n"
            "    inside = os.getpriority(os.PRIO_PROCESS, 0)\n"
            "after = os.getpriority(os.PRIO_PROCESS, 0)\n"
            "print(before, inside, after)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, inside, after = map(int, out.stdout.split())
    assert inside == before + 4
    # Lowering it back needs CAP_SYS_NICE: without it, a warning instead.
    assert after == before or "cannot go back" in out.stderr


def test_niceness_refused_warns_and_runs_the_block(monkeypatch, caplog):
    def refuse(which, who, value):
        raise PermissionError("no CAP_SYS_NICE")

    monkeypatch.setattr(serve.os, "setpriority", refuse)
    ran = False
    with caplog.at_level(logging.WARNING):
        with serve.niceness(serve.os.getpriority(serve.os.PRIO_PROCESS, 0) - 5):
            ran = True
    assert ran and "CAP_SYS_NICE" in caplog.text
