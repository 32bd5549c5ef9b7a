"""slonn.scheduler.aio.run: the same coroutine on the standard loop and on uvloop."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from slonn.scheduler import aio


async def _loop_name() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__


def test_asyncio_loop():
    assert aio.run(_loop_name(), "asyncio").startswith("asyncio")


@pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop not installed")
def test_uvloop_loop():
    assert aio.run(_loop_name(), "uvloop").startswith("uvloop")


def test_unknown_loop_names_the_choices_and_closes_the_coroutine():
    coro = _loop_name()
    with pytest.raises(ValueError, match="event_loop='trio'.*asyncio"):
        aio.run(coro, "trio")
    assert coro.cr_frame is None  # closed: no "never awaited" warning


def test_missing_uvloop_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_uvloop(name, *args, **kwargs):
        if name == "uvloop":
            raise ImportError("no uvloop")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    with pytest.raises(SystemExit, match=r"pip install uvloop"):
        aio.run(_loop_name(), "uvloop")


def test_default_loop_is_uvloop_where_installed():
    installed = importlib.util.find_spec("uvloop") is not None
    assert aio.DEFAULT_EVENT_LOOP == ("uvloop" if installed else "asyncio")
    assert aio.run(_loop_name()).startswith(aio.DEFAULT_EVENT_LOOP)
