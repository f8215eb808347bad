"""Fixtures shared by the proxy's socket tests and the catalog tests."""

from collections.abc import AsyncIterator

import pytest

from tests.unit.proxy_harness import Upstream, start_upstream


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """A local aiohttp app standing in for a guest (echo, streams, WebSocket)."""
    up = await start_upstream()
    yield up
    await up.runner.cleanup()
