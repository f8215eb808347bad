"""Fixtures shared by the proxy's socket tests and the catalog tests."""

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.pg import PgCluster, PgUnavailable
from tests.unit.proxy_harness import Upstream, start_upstream


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """A local aiohttp app standing in for a guest (echo, streams, WebSocket)."""
    up = await start_upstream()
    yield up
    await up.runner.cleanup()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One real PostgreSQL for the session (unix socket only); missing PostgreSQL fails the tests."""
    try:
        cluster = PgCluster()
        cluster.start()
    except PgUnavailable as exc:
        problem = str(exc)
    else:
        yield cluster
        cluster.stop()
        return
    pytest.fail(f"PostgreSQL is needed for the catalog tests: {problem}", pytrace=False)
