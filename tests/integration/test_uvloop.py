"""`slonn serve --event-loop uvloop` answers a replay sent from a uvloop client, both transports."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from slonn.scheduler import aio
from slonn.scheduler.replay import replay
from slonn.scheduler.serverproc import ServerProcess
from slonn.scheduler.trace import Arrivals

pytestmark = pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop not installed")


@pytest.fixture(scope="module")
def uv_server(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uv")
    classes = tmp / "classes.toml"
    classes.write_text('[[class]]\nname = "roomy"\nlatency_ms = 20000\non_late = "serve"\n')
    log = tmp / "serve.log"
    with ServerProcess(["--model-dir", str(tiny_model_dir), "--workers", "1", "--classes", str(classes),
                        "--event-loop", "uvloop"], log) as srv:
        yield srv
    assert srv.returncode == 0, log.read_text()[-2000:]  # SIGTERM -> drained -> exit 0
    assert "uvloop" in log.read_text()


@pytest.mark.parametrize("transport", ["unary", "stream"])
def test_every_request_answered_on_uvloop(uv_server, transport):
    n = 40
    arrivals = Arrivals(np.linspace(0.0, 0.4, n), ["roomy"] * n, "test", (0.0, 0.4), 1.0)
    records = aio.run(replay(uv_server.target, "tiny", arrivals, {"roomy": 20000.0}, progress=False,
                             transport=transport), "uvloop")
    assert len(records) == n and {r.status for r in records} == {"OK"}
    assert sorted(r.index for r in records) == list(range(n))
    assert np.mean([r.correct for r in records]) > 0.5  # real answers, checked against the labels
