"""Helpers for the integration tests that run a real server."""

from __future__ import annotations

import grpc
import numpy as np

from slonn.scheduler.config import ServerConfig
from slonn.scheduler.server import SlonnServer
from slonn.workers.kernels import EXACT_KERNELS


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


APPROXIMATE_REL_L2 = 0.15
"""How far a low-precision kernel's answer may be from the fp32 reference at the same level, as a share of the
reference's L2 norm. Not an elementwise tolerance: in bf16 a unit at the top-k threshold can swap with the next
one, which moves a few outputs by up to ~1 on a logit scale of ~10 (seen: 7.5% of the norm at keep 0.1)."""


def assert_matches_reference(got: np.ndarray, want: np.ndarray, kernel: str) -> None:
    """The server's output equals the local fp32 model's at the level it ran: to 1e-4 from an exact kernel;
    from a low-precision one, the same class and within APPROXIMATE_REL_L2 of the reference."""
    got, want = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    assert got.shape == want.shape
    if kernel in EXACT_KERNELS:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        return
    assert got.argmax() == want.argmax(), (got, want)
    assert np.linalg.norm(got - want) <= APPROXIMATE_REL_L2 * np.linalg.norm(want), (kernel, got, want)
