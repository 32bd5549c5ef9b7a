"""Helpers for the integration tests that run a real server."""

from __future__ import annotations

import grpc
import numpy as np

from slonn.scheduler.config import ServerConfig
from slonn.scheduler.server import SlonnServer


async def started_server(cfg: ServerConfig) -> SlonnServer:
    """A started server; if the start fails, its worker pool is closed before the error goes on."""
    srv = SlonnServer(cfg)
    try:
        await srv.start()
    except BaseException:
        if hasattr(srv, "pool"):
            await srv.pool.close()
        raise
    return srv


def x(i: int) -> np.ndarray:
    """A digit-like input (64 features in the digits' 0..16 range), distinct per ``i``."""
    return np.random.default_rng(i).uniform(0, 16, 64).astype(np.float32)


async def outcome(coro) -> str:
    """"OK", or the name of the gRPC status the call ended with."""
    try:
        await coro
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "OK"
