"""Hostile clients: too many header fields, bodies that trickle in, too many connections from one address."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.unit.proxy_harness import VM, Edge, FakeBackend, Upstream, start_edge


async def _edge(upstream: Upstream, **settings: Any) -> Edge:
    backend = FakeBackend()
    backend.add_vm(VM, upstream.port)
    return await start_edge(backend, **settings)


@pytest.fixture
async def edge(upstream: Upstream) -> AsyncIterator[Edge]:
    e = await _edge(upstream, max_headers=10)
    yield e
    await e.close()


def _sample(edge: Edge, name: str, labels: dict[str, str] | None = None) -> float:
    return edge.ctx.metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def test_too_many_header_fields_get_431_and_close(edge: Edge) -> None:
    c = await edge.connect()
    fields = "".join(f"X-F{i}: v\r\n" for i in range(11))
    await c.send(f"GET /echo HTTP/1.1\r\nHost: {edge.host()}\r\n{fields}\r\n".encode())
    resp = await c.response()
    assert resp.status == 431 and resp.json()["error"] == "headers_too_large"
    assert "more than 10 header fields" in resp.json()["message"]
    assert await c.closed()


async def test_header_fields_trickling_in_are_counted_before_the_head_ends(edge: Edge) -> None:
    c = await edge.connect()
    await c.send(f"GET /echo HTTP/1.1\r\nHost: {edge.host()}\r\n".encode())
    for i in range(12):  # the head never ends; the 11th field is already one too many
        await c.send(f"X-F{i}: v\r\n".encode())
        await asyncio.sleep(0.005)
    resp = await c.response()
    assert resp.status == 431
    assert await c.closed()


async def test_header_fields_up_to_the_limit_pass(edge: Edge) -> None:
    c = await edge.connect()
    headers = {f"X-F{i}": "v" for i in range(8)}
    headers["Authorization"] = f"Bearer {edge.token()}"
    assert (await c.get("/echo", edge.host(), headers)).status == 200  # Host + 9 = 10 fields
    c.close()


async def test_a_body_slower_than_body_timeout_gets_408_and_its_upstream_is_closed(upstream: Upstream) -> None:
    edge = await _edge(upstream, body_timeout=0.6, idle_timeout=5.0)
    try:
        c = await edge.connect()
        head = f"POST /upload HTTP/1.1\r\nHost: {edge.host()}\r\nAuthorization: Bearer {edge.token()}\r\n"
        await c.send((head + "Content-Length: 1000\r\n\r\n").encode())
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = asyncio.ensure_future(c.response())
        for _ in range(40):  # one byte every 50 ms: never idle, but never done either
            if answer.done():
                break
            await c.send(b"x")
            await asyncio.sleep(0.05)
        resp = await answer
        assert resp.status == 408 and resp.json()["error"] == "request_timeout"
        assert "longer than 0.6s" in resp.json()["message"]
        assert 0.5 < loop.time() - started < 1.9
        assert await c.closed()
        assert edge.ctx.pool.idle_count(VM) == 0, "an upstream with half a body on it is never pooled"
        assert edge.ctx.open_streams == {}
        assert _sample(edge, "mvm_slow_clients_total") == 1
    finally:
        await edge.close()


async def test_a_body_below_body_min_rate_gets_408(upstream: Upstream) -> None:
    edge = await _edge(upstream, body_min_rate=1000, body_rate_grace=0.3, idle_timeout=5.0)
    try:
        c = await edge.connect()
        head = f"POST /upload HTTP/1.1\r\nHost: {edge.host()}\r\nAuthorization: Bearer {edge.token()}\r\n"
        await c.send((head + "Content-Length: 100000\r\n\r\n").encode())
        answer = asyncio.ensure_future(c.response())
        for _ in range(60):  # 10 bytes every 20 ms: 500 bytes/s
            if answer.done():
                break
            await c.send(b"x" * 10)
            await asyncio.sleep(0.02)
        resp = await answer
        assert resp.status == 408 and "slower than 1000 bytes/s" in resp.json()["message"]
        assert await c.closed()
    finally:
        await edge.close()


async def test_a_body_at_a_good_rate_passes(upstream: Upstream) -> None:
    edge = await _edge(upstream, body_min_rate=1000, body_rate_grace=0.1, body_timeout=5.0)
    try:
        c = await edge.connect()
        head = f"POST /upload HTTP/1.1\r\nHost: {edge.host()}\r\nAuthorization: Bearer {edge.token()}\r\n"
        await c.send((head + "Content-Length: 20000\r\n\r\n").encode())
        for _ in range(10):  # 2000 bytes every 20 ms
            await c.send(b"y" * 2000)
            await asyncio.sleep(0.02)
        resp = await c.response()
        assert resp.status == 200 and resp.json()["length"] == 20000
        c.close()
    finally:
        await edge.close()


async def test_time_the_edge_holds_a_body_does_not_count_against_the_client(upstream: Upstream) -> None:
    """A body waiting for a wake (reading paused by the edge) is not cut by body_timeout."""
    from vmm.model import VmState

    backend = FakeBackend()
    backend.add_vm(VM, upstream.port, state=VmState.SUSPENDED)
    backend.wake_gate = asyncio.Event()
    edge = await start_edge(backend, body_timeout=1.0)
    try:
        c = await edge.connect()
        head = f"POST /upload HTTP/1.1\r\nHost: {edge.host()}\r\nAuthorization: Bearer {edge.token()}\r\n"
        held, tail = 600 * 1024, 6 * 1000  # past the hold buffer: the edge pauses reading until the VM is up
        await c.send((head + f"Content-Length: {held + tail}\r\n\r\n").encode())
        c.writer.write(b"z" * held)
        await asyncio.sleep(1.5)  # longer than body_timeout, all of it paused by the edge
        backend.wake_gate.set()
        await asyncio.wait_for(c.writer.drain(), 5)
        for _ in range(6):  # then 0.6 s of the client's own time, within body_timeout
            await c.send(b"t" * 1000)
            await asyncio.sleep(0.1)
        resp = await c.response()
        assert resp.status == 200 and resp.json()["length"] == held + tail
        c.close()
    finally:
        await edge.close()


async def test_connections_past_the_per_ip_limit_get_429(upstream: Upstream) -> None:
    edge = await _edge(upstream, max_connections_per_ip=3)
    try:
        kept = [await edge.connect() for _ in range(3)]
        extra = await edge.connect()
        resp = await extra.response()
        assert resp.status == 429 and resp.json()["error"] == "too_many_requests"
        assert resp.header("Retry-After") == "2"
        assert await extra.closed()
        assert _sample(edge, "mvm_connections_refused_total", {"reason": "per_ip"}) == 1
        assert edge.ctx.per_ip == {b"127.0.0.1": 3}
        kept[0].close()
        async with asyncio.timeout(5):
            while edge.ctx.per_ip != {b"127.0.0.1": 2}:
                await asyncio.sleep(0.01)
        again = await edge.connect()
        assert (await again.get("/echo", edge.host(), {"Authorization": f"Bearer {edge.token()}"})).status == 200
        for c in [*kept, again]:
            c.close()
        async with asyncio.timeout(5):
            while edge.ctx.per_ip:
                await asyncio.sleep(0.01)
        assert _sample(edge, "mvm_client_connections") == 0
    finally:
        await edge.close()


async def test_trusted_proxies_are_exempt_from_the_per_ip_limit(upstream: Upstream) -> None:
    import ipaddress

    loopback = (ipaddress.ip_network("127.0.0.0/8"),)
    edge = await _edge(upstream, max_connections_per_ip=1, trusted_proxies=loopback)
    try:
        clients = [await edge.connect() for _ in range(3)]
        for c in clients:
            assert (await c.get("/echo", edge.host(), {"Authorization": f"Bearer {edge.token()}"})).status == 200
            c.close()
    finally:
        await edge.close()
