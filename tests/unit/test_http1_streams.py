"""Streaming through the edge: big bodies both ways with flow control, SSE, WebSockets,
and either side going away mid-message."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from tests.unit.proxy_harness import VM, Edge, FakeBackend, Upstream, edge_over_raw, start_edge

BIG = 50 * 1024 * 1024
BLOCK = bytes(range(256)) * 256  # 64 KiB


@pytest.fixture
async def edge(upstream: Upstream) -> AsyncIterator[Edge]:
    backend = FakeBackend()
    backend.add_vm(VM, upstream.port)
    e = await start_edge(backend)
    yield e
    await e.close()


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `cond` every 10 ms, failing after `timeout` seconds."""
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def _stalled(value: Callable[[], int], polls: int = 5, limit: int = 500) -> int:
    """Wait until `value()` stops changing for `polls` consecutive 20 ms polls."""
    last, same = -1, 0
    for _ in range(limit):
        await asyncio.sleep(0.02)
        now = value()
        same = same + 1 if now == last else 0
        last = now
        if same >= polls:
            return now
    raise AssertionError("never stalled")


def _pattern_sha(size: int) -> str:
    h = hashlib.sha256()
    left = size
    while left:
        piece = BLOCK[: min(len(BLOCK), left)]
        h.update(piece)
        left -= len(piece)
    return h.hexdigest()


async def test_large_upload_is_streamed_with_backpressure(edge: Edge, upstream: Upstream) -> None:
    c = await edge.connect()
    head = f"POST /upload?wait=1 HTTP/1.1\r\nHost: {edge.host()}\r\nAuthorization: Bearer {edge.token()}\r\n"
    await c.send((head + f"Content-Length: {BIG}\r\n\r\n").encode())
    sent = [0]

    async def pump() -> None:
        while sent[0] < BIG:
            c.writer.write(BLOCK)
            sent[0] += len(BLOCK)
            await c.writer.drain()

    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    try:
        writer = asyncio.create_task(pump())
        # The guest reads nothing yet: the edge must stop reading the client, not buffer.
        stalled_at = await _stalled(lambda: sent[0])
        assert stalled_at < BIG - 8 * len(BLOCK)
        upstream.state["upload_go"].set()
        doc = (await c.response()).json()
        await writer
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert doc == {"length": BIG, "sha": _pattern_sha(BIG)}
    assert peak - base < 16 * 1024 * 1024  # far below the body size
    c.close()


async def test_large_download_is_streamed_with_backpressure(edge: Edge, upstream: Upstream) -> None:
    c = await edge.connect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    try:
        await c.send(
            f"GET /download?size={BIG}&cl=1 HTTP/1.1\r\nHost: {edge.host()}\r\n"
            f"Authorization: Bearer {edge.token()}\r\n\r\n".encode()
        )
        status, headers = await c.head()
        assert status == 200 and ("Content-Length", str(BIG)) in headers
        # The client reads nothing for now: the guest must be slowed down, not buffered.
        written = await _stalled(lambda: upstream.state["progress"]["written"])
        assert written < BIG - 8 * len(BLOCK)
        h = hashlib.sha256()
        got = 0
        while got < BIG:
            piece = await c.reader.read(1 << 20)
            assert piece
            h.update(piece)
            got += len(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == BIG and h.hexdigest() == _pattern_sha(BIG)
    assert peak - base < 16 * 1024 * 1024  # far below the body size
    # The connection is still good for another request.
    assert (await c.get("/echo", edge.host(), {"Authorization": f"Bearer {edge.token()}"})).status == 200
    c.close()


async def test_server_sent_events_arrive_as_sent(edge: Edge, upstream: Upstream) -> None:
    c = await edge.connect()
    await c.send(f"GET /sse HTTP/1.1\r\nHost: {edge.host()}\r\nAuthorization: Bearer {edge.token()}\r\n\r\n".encode())
    status, _ = await c.head()
    assert status == 200
    first = await asyncio.wait_for(c.reader.readuntil(b"data: one\n\n"), 5)
    assert first.endswith(b"data: one\n\n")
    assert edge.ctx.open_streams == {VM: 1}  # the stream keeps the VM awake
    upstream.state["sse_go"].set()
    rest = await asyncio.wait_for(c.reader.readuntil(b"0\r\n\r\n"), 5)
    assert b"data: two\n\n" in rest
    await _until(lambda: edge.ctx.open_streams == {})
    c.close()


async def test_websocket_echo_through_the_tunnel(edge: Edge) -> None:
    async with aiohttp.ClientSession() as session:
        headers = {"Host": edge.host(), "Authorization": f"Bearer {edge.token()}"}
        async with session.ws_connect(f"http://127.0.0.1:{edge.port}/ws", headers=headers) as ws:
            assert edge.ctx.open_streams == {VM: 1}
            for i in range(20):
                await ws.send_str(f"hello {i}")
                assert (await ws.receive(timeout=5)).data == f"echo:hello {i}"
            payload = os.urandom(300_000)
            await ws.send_bytes(payload)
            assert (await ws.receive(timeout=5)).data == payload[::-1]
    await _until(lambda: edge.ctx.open_streams == {})
    assert edge.ctx.pool.idle_count(VM) == 0  # a tunnelled connection is never pooled
    assert edge.count(101) == 1


async def test_websocket_with_query_token_gets_cookie_on_101(edge: Edge) -> None:
    c = await edge.connect()
    await c.send(
        f"GET /ws?token={edge.token()} HTTP/1.1\r\nHost: {edge.host()}\r\nConnection: Upgrade\r\n"
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
    )
    status, headers = await c.head()
    assert status == 101
    assert any(k == "Set-Cookie" and v.startswith("mvm_token=") for k, v in headers)
    mask = b"\x01\x02\x03\x04"
    text = b"hi"
    await c.send(b"\x81" + bytes([0x80 | len(text)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text)))
    frame = await asyncio.wait_for(c.reader.readexactly(2 + len(b"echo:hi")), 5)
    assert frame == b"\x81\x07echo:hi"
    c.close()


async def test_refused_upgrade_closes_after_the_answer(edge: Edge) -> None:
    c = await edge.connect()
    await c.send(
        f"GET /echo HTTP/1.1\r\nHost: {edge.host()}\r\nAuthorization: Bearer {edge.token()}\r\n"
        "Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n".encode()
    )
    resp = await c.response()
    assert resp.status == 200
    assert resp.json()["method"] == "GET"
    assert await c.closed()


async def test_client_disconnect_mid_body_closes_the_upstream(edge: Edge, upstream: Upstream) -> None:
    c = await edge.connect()
    head = f"POST /upload HTTP/1.1\r\nHost: {edge.host()}\r\nAuthorization: Bearer {edge.token()}\r\n"
    await c.send((head + f"Content-Length: {BIG}\r\n\r\n").encode() + BLOCK * 16)
    await _until(lambda: upstream.state["progress"]["read"] > 0)
    c.writer.transport.abort()
    await _until(lambda: edge.ctx.open_streams == {})
    assert edge.ctx.pool.idle_count(VM) == 0
    # The edge is fine afterwards.
    c2 = await edge.connect()
    assert (await c2.get("/echo", edge.host(), {"Authorization": f"Bearer {edge.token()}"})).status == 200
    c2.close()


async def test_upstream_closing_mid_response_closes_the_client() -> None:
    async def truncating(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
        await writer.drain()
        writer.close()

    async with edge_over_raw(truncating) as edge:
        c = await edge.connect()
        await c.send(f"GET / HTTP/1.1\r\nHost: {edge.host()}\r\nAuthorization: Bearer {edge.token()}\r\n\r\n".encode())
        status, _ = await c.head()
        assert status == 200
        assert await asyncio.wait_for(c.reader.read(), 5) == b"0123456789"
        await _until(lambda: edge.ctx.open_streams == {})
        c.close()


async def test_response_ending_at_close_is_relayed_whole() -> None:
    async def until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async with edge_over_raw(until_eof) as edge:
        c = await edge.connect()
        resp = await c.get("/", edge.host(), {"Authorization": f"Bearer {edge.token()}"})
        assert resp.status == 200 and resp.body == b"all of it"
        c.close()


async def test_invalid_upstream_response_is_502() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()

    async with edge_over_raw(garbage) as edge:
        c = await edge.connect()
        resp = await c.get("/", edge.host(), {"Authorization": f"Bearer {edge.token()}"})
        assert resp.status == 502 and resp.json()["error"] == "bad_gateway"
        c.close()
