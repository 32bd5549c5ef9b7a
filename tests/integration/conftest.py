"""Shared integration fixtures. Each test module defines its own module-scoped ``server``."""

from __future__ import annotations

import pytest_asyncio

from slonn.protos.client import AsyncSlonnClient


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(server):
    """An asyncio client connected to the requesting module's ``server``."""
    c = AsyncSlonnClient(f"127.0.0.1:{server.port}")
    await c.wait_ready(30.0)
    yield c
    await c.close()
