"""The upstream keep-alive pool with real connections to a local listener."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from edge.upstream import UpstreamConn, UpstreamPool, connect_vm
from tests.unit.proxy_harness import VM, FakeBackend, raw_server


@pytest.fixture
async def listener() -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    peers: list[asyncio.StreamWriter] = []

    async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer)
        await reader.read()

    server, port = await raw_server(keep)
    yield port, peers
    for w in peers:
        w.close()
    server.close()


async def _conns(pool: UpstreamPool, port: int, n: int, vm_id: str = VM) -> list[UpstreamConn]:
    backend = FakeBackend()
    backend.add_vm(vm_id, port)
    return [await connect_vm(pool, backend, vm_id, 8080, 1.0) for _ in range(n)]


async def _until(cond: object, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def _now() -> float:
    return asyncio.get_running_loop().time()


async def test_release_and_acquire_newest_first(listener: tuple[int, list]) -> None:
    pool = UpstreamPool(per_vm=4, idle_timeout=30)
    a, b = await _conns(pool, listener[0], 2)
    pool.release(a, _now())
    pool.release(b, _now())
    assert pool.idle_count(VM) == 2
    assert pool.acquire(VM, 8080, _now(), 0) is b
    assert pool.acquire(VM, 8080, _now(), 0) is a
    assert pool.acquire(VM, 8080, _now(), 0) is None
    assert pool.acquire(VM, 9999, _now(), 0) is None
    pool.close()


async def test_bounded_per_vm(listener: tuple[int, list]) -> None:
    pool = UpstreamPool(per_vm=2, idle_timeout=30, surplus_grace=0)
    conns = await _conns(pool, listener[0], 3)
    for c in conns:
        pool.release(c, _now())
    assert pool.idle_count(VM) == 2
    assert conns[2].closed
    pool.close()
    assert all(c.closed for c in conns)


async def test_connections_past_the_bound_stay_for_the_grace_then_close_oldest_first(
    listener: tuple[int, list],
) -> None:
    """Under load they are taken again at once: closed, each would be reopened for the next request."""
    pool = UpstreamPool(per_vm=2, idle_timeout=30, surplus_grace=0.1)
    conns = await _conns(pool, listener[0], 4)
    for c in conns:
        pool.release(c, _now())
    assert pool.idle_count(VM) == 4 and not any(c.closed for c in conns)
    taken = pool.acquire(VM, 8080, _now(), 0)
    assert taken is conns[3]
    await _until(lambda: pool.idle_count(VM) == 2)
    assert conns[0].closed and not conns[1].closed and not conns[2].closed
    pool.release(taken, _now())
    await _until(lambda: pool.idle_count(VM) == 2)
    assert conns[1].closed and not conns[2].closed and not taken.closed
    assert pool.live_count(VM) == 2
    pool.close()
    assert all(c.closed for c in conns)


async def test_zero_disables_pooling(listener: tuple[int, list]) -> None:
    pool = UpstreamPool(per_vm=0, idle_timeout=30)
    (c,) = await _conns(pool, listener[0], 1)
    pool.release(c, _now())
    assert c.closed and pool.idle_count(VM) == 0


async def test_idle_connections_expire(listener: tuple[int, list]) -> None:
    pool = UpstreamPool(per_vm=4, idle_timeout=0.1)
    a, b = await _conns(pool, listener[0], 2)
    pool.release(a, _now() - 1)  # idle for a second already
    assert pool.acquire(VM, 8080, _now(), 0) is None
    assert a.closed
    pool.release(b, _now())
    await _until(lambda: b.closed)  # the sweep closes it
    assert pool.idle_count(VM) == 0
    pool.close()


async def test_peer_closing_an_idle_connection_removes_it(listener: tuple[int, list]) -> None:
    port, peers = listener
    pool = UpstreamPool(per_vm=4, idle_timeout=30)
    (c,) = await _conns(pool, port, 1)
    pool.release(c, _now())
    await _until(lambda: len(peers) == 1)
    peers[0].close()
    await _until(lambda: pool.idle_count(VM) == 0)
    assert c.closed
    pool.close()


async def test_unsolicited_bytes_on_an_idle_connection_close_it(listener: tuple[int, list]) -> None:
    port, peers = listener
    pool = UpstreamPool(per_vm=4, idle_timeout=30)
    (c,) = await _conns(pool, port, 1)
    pool.release(c, _now())
    await _until(lambda: len(peers) == 1)
    peers[0].write(b"HTTP/1.1 200 OK\r\n\r\n")
    await _until(lambda: pool.idle_count(VM) == 0)
    assert c.closed
    pool.close()


async def test_drop_vm_closes_only_that_vm(listener: tuple[int, list]) -> None:
    pool = UpstreamPool(per_vm=4, idle_timeout=30)
    mine = await _conns(pool, listener[0], 2)
    theirs = await _conns(pool, listener[0], 1, vm_id="vmother1")
    for c in [*mine, *theirs]:
        pool.release(c, _now())
    assert pool.drop_vm(VM) == 2
    assert all(c.closed for c in mine)
    assert pool.idle_count(VM) == 0 and pool.idle_count("vmother1") == 1
    pool.close()


async def test_drop_vm_keeps_connections_in_use_from_coming_back(listener: tuple[int, list]) -> None:
    pool = UpstreamPool(per_vm=4, idle_timeout=30)
    (busy,) = await _conns(pool, listener[0], 1)
    pool.drop_vm(VM)  # e.g. paused from the control API while a request was in flight
    assert not busy.closed
    pool.release(busy, _now())
    assert busy.closed and pool.idle_count(VM) == 0
    (fresh,) = await _conns(pool, listener[0], 1)
    pool.release(fresh, _now())
    assert pool.idle_count(VM) == 1
    pool.close()


async def test_closed_connections_are_forgotten(listener: tuple[int, list]) -> None:
    port, peers = listener
    pool = UpstreamPool(per_vm=4, idle_timeout=30)
    a, b = await _conns(pool, port, 2)
    a.owner = b.owner = _Owner()
    a.close()
    await _until(lambda: len(peers) == 2)
    for w in peers:
        w.close()
    await _until(lambda: b.closed)
    assert pool._live == {}
    pool.close()


class _Owner:
    def upstream_data(self, data: bytes) -> None: ...
    def upstream_lost(self, conn: UpstreamConn) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    def upstream_resume_writing(self) -> None: ...
