"""Every async test runs on uvloop, the event loop `mvm serve` uses; one real PostgreSQL per session;
and no network namespace a run made outlives it."""

import asyncio
from collections.abc import Callable, Iterator, Mapping

import pytest
import uvloop

from tests.pg import PgCluster, PgUnavailable
from tests.workers import Scheduler
from vmm.network import netns

_NAMESPACES_BEFORE = pytest.StashKey[set[str]]()


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the run itself, not one of its `-n 2` workers
        session.config.stash[_NAMESPACES_BEFORE] = set(netns.list_project_namespaces())


@pytest.hookimpl(trylast=True)  # after xdist has ended the workers
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Namespaces that appeared during the run and hold no process: a test that failed before its own
    clean-up (its per-test sweep is off while a sibling worker runs) left them."""
    from tests.e2e.conftest import in_use, others_make_namespaces

    before = session.config.stash.get(_NAMESPACES_BEFORE, None)
    if before is None or others_make_namespaces():
        return
    for name in set(netns.list_project_namespaces()) - before:
        if not in_use(name):
            asyncio.run(netns.delete(name.removeprefix("mvm-")))


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
