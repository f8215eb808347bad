"""Every async test runs on uvloop, the event loop `mvm serve` uses; one real PostgreSQL per session."""

from collections.abc import Callable, Iterator, Mapping

import pytest
import uvloop

from tests.pg import PgCluster, PgUnavailable
from tests.workers import Scheduler


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> Scheduler:
    """`pytest -n 2`: test by test, but some files on one worker (tests/workers.py)."""
    return Scheduler(config, log)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Callable[[], object]]:
    return {"uvloop": uvloop.new_event_loop}


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
