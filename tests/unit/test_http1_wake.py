"""Holding requests while a VM wakes, and the edge's answers when a VM or its port fails."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest

from tests.unit.proxy_harness import VM, Client, Edge, FakeBackend, Upstream, edge_over_raw, start_edge
from vmm.errors import RestoreFailed, VmFailed
from vmm.model import VmState


async def _edge(upstream_port: int, state: VmState = VmState.SUSPENDED, **settings: object) -> Edge:
    backend = FakeBackend()
    backend.add_vm(VM, upstream_port, state=state)
    return await start_edge(backend, **settings)


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def _sample(edge: Edge, name: str, labels: dict[str, str] | None = None) -> float:
    return edge.ctx.metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def _request(edge: Edge, path: str = "/echo") -> Client:
    c = await edge.connect()
    await c.send(f"GET {path} HTTP/1.1\r\nHost: {edge.host()}\r\nAuthorization: Bearer {edge.token()}\r\n\r\n".encode())
    return c


async def test_fifty_requests_share_one_wake(upstream: Upstream) -> None:
    edge = await _edge(upstream.port)
    edge.backend.wake_delay = 0.3
    try:
        clients = [await _request(edge, f"/echo?n={n}") for n in range(50)]
        responses = await asyncio.gather(*(c.response() for c in clients))
        assert [r.status for r in responses] == [200] * 50
        assert [r.json()["target"] for r in responses] == [f"/echo?n={n}" for n in range(50)]
        assert edge.backend.ensure_calls == 1
        assert _sample(edge, "mvm_wakes_total", {"result": "ok"}) == 1, "one wake, however many waited"
        assert _sample(edge, "mvm_wake_seconds_count") == 1
        assert _sample(edge, "mvm_held_requests") == 0
        assert edge.ctx.held == {}
        # Now running: no more wakes, nothing reported.
        c = await _request(edge)
        assert (await c.response()).status == 200
        assert edge.backend.ensure_calls == 1 and _sample(edge, "mvm_wake_seconds_count") == 1
        for client in [*clients, c]:
            client.close()
    finally:
        await edge.close()


async def test_body_read_before_the_wake_is_kept(upstream: Upstream) -> None:
    edge = await _edge(upstream.port)
    edge.backend.wake_gate = asyncio.Event()
    try:
        c = await edge.connect()
        head = f"POST /echo HTTP/1.1\r\nHost: {edge.host()}\r\nAuthorization: Bearer {edge.token()}\r\n"
        await c.send((head + "Content-Length: 11\r\n\r\nhello").encode())
        await _until(lambda: edge.ctx.held.get(VM) == 1)
        await c.send(b" world")
        edge.backend.wake_gate.set()
        assert (await c.response()).json()["body"] == "hello world"
        c.close()
    finally:
        await edge.close()


async def test_held_requests_beyond_the_bound_get_503(upstream: Upstream) -> None:
    edge = await _edge(upstream.port, max_held_per_vm=5)
    edge.backend.wake_gate = asyncio.Event()
    try:
        clients = [await _request(edge) for _ in range(8)]
        await _until(lambda: edge.ctx.held.get(VM) == 5)
        pending = [asyncio.ensure_future(c.response()) for c in clients]
        await _until(lambda: sum(p.done() for p in pending) == 3)
        refused = [p.result() for p in pending if p.done()]
        assert all(r.status == 503 for r in refused)
        assert all(r.header("Retry-After") == "2" for r in refused)
        edge.backend.wake_gate.set()
        statuses = sorted(r.status for r in await asyncio.gather(*pending))
        assert statuses == [200] * 5 + [503] * 3
        assert edge.ctx.held == {}
        for c in clients:
            c.close()
    finally:
        await edge.close()


async def test_wake_timeout_is_503_with_retry_after(upstream: Upstream) -> None:
    edge = await _edge(upstream.port, wake_timeout=0.2, retry_after=7)
    edge.backend.wake_gate = asyncio.Event()  # never set
    try:
        c = await _request(edge)
        resp = await c.response()
        assert resp.status == 503
        assert resp.header("Retry-After") == "7"
        assert resp.json()["error"] == "unavailable"
        assert _sample(edge, "mvm_wakes_total", {"result": "failed"}) == 0, "the wake itself goes on"
        assert edge.ctx.held == {}
        assert edge.ctx.open_streams == {}
        c.close()
    finally:
        await edge.close()


@pytest.mark.parametrize(
    ("error", "status"), [(RestoreFailed("snapshot unreadable"), 503), (VmFailed("qemu died"), 502)]
)
async def test_wake_errors_carry_their_status_and_message(upstream: Upstream, error: Exception, status: int) -> None:
    edge = await _edge(upstream.port)
    edge.backend.wake_error = error
    try:
        c = await _request(edge)
        resp = await c.response()
        assert resp.status == status
        assert resp.json()["message"] == str(error)
        assert (resp.header("Retry-After") is not None) == (status == 503)
        assert _sample(edge, "mvm_wakes_total", {"result": "failed"}) == 1
        # The connection stays usable: the request was complete.
        edge.backend.wake_error = None
        assert (await c.get("/echo", edge.host(), {"Authorization": f"Bearer {edge.token()}"})).status == 200
        c.close()
    finally:
        await edge.close()


async def test_client_leaving_while_held_releases_its_place(upstream: Upstream) -> None:
    edge = await _edge(upstream.port)
    edge.backend.wake_gate = asyncio.Event()
    try:
        c = await _request(edge)
        await _until(lambda: edge.ctx.held.get(VM) == 1)
        c.writer.transport.abort()
        await _until(lambda: edge.ctx.held == {} and edge.ctx.open_streams == {})
        edge.backend.wake_gate.set()
        c2 = await _request(edge)
        assert (await c2.response()).status == 200
        assert edge.backend.ensure_calls == 1  # the wake went on without the first client
        c2.close()
    finally:
        await edge.close()


async def test_refused_connection_is_502() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    edge = await _edge(port, state=VmState.RUNNING)
    try:
        c = await _request(edge)
        resp = await c.response()
        assert resp.status == 502 and resp.json()["error"] == "bad_gateway"
        assert edge.count(502) == 1
        c.close()
    finally:
        await edge.close()


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_connect_that_fails_asks_the_vms_owner_and_tries_once_more(upstream: Upstream, method: str) -> None:
    """The edge took the VM for running but its host had just suspended it: the connect fails
    before anything was sent, so the edge asks (which wakes it) and connects again."""
    edge = await _edge(upstream.port, state=VmState.RUNNING)
    edge.backend.unreachable.add(VM)
    try:
        c = await edge.connect()
        await c.send(
            f"{method} /echo HTTP/1.1\r\nHost: {edge.host()}\r\nAuthorization: Bearer {edge.token()}\r\n"
            "Content-Length: 0\r\n\r\n".encode()
        )
        resp = await c.response()
        assert resp.status == 200
        assert edge.backend.confirm_calls == 1 and edge.backend.opened == 2
        c.close()
    finally:
        await edge.close()


async def test_connect_timeout_is_504(upstream: Upstream) -> None:
    edge = await _edge(upstream.port, state=VmState.RUNNING, connect_timeout=0.1)
    edge.backend.connect_delay = 5
    try:
        c = await _request(edge)
        resp = await c.response()
        assert resp.status == 504 and resp.json()["error"] == "gateway_timeout"
        c.close()
    finally:
        await edge.close()


async def test_upstream_that_never_answers_is_504() -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()

    async with edge_over_raw(silent, read_timeout=0.3) as edge:
        c = await _request(edge)
        resp = await c.response()
        assert resp.status == 504
        assert "did not answer" in resp.json()["message"]
        assert edge.ctx.pool.idle_count(VM) == 0
        c.close()


async def test_upstream_closing_without_answer_is_502() -> None:
    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async with edge_over_raw(rude) as edge:
        c = await _request(edge)
        assert (await c.response()).status == 502
        c.close()


async def test_idle_client_connection_is_closed() -> None:
    edge = await _edge(1, state=VmState.RUNNING, idle_timeout=0.2)
    try:
        c = await edge.connect()
        await c.send(b"GET / HTTP/1.1\r\nHo")  # a head that never completes
        assert await c.closed()
    finally:
        await edge.close()


async def test_stalled_request_body_gets_408(upstream: Upstream) -> None:
    edge = await _edge(upstream.port, state=VmState.RUNNING, idle_timeout=0.3)
    try:
        c = await edge.connect()
        head = f"POST /upload HTTP/1.1\r\nHost: {edge.host()}\r\nAuthorization: Bearer {edge.token()}\r\n"
        await c.send((head + "Content-Length: 100\r\n\r\n0123456789").encode())
        resp = await c.response()
        assert resp.status == 408
        assert await c.closed()
        assert edge.ctx.open_streams == {}
    finally:
        await edge.close()


async def test_queued_request_waits_for_a_wake_if_its_vm_fell_asleep(upstream: Upstream) -> None:
    edge = await _edge(upstream.port, state=VmState.RUNNING)
    try:
        c = await edge.connect()
        head = f"Host: {edge.host()}\r\nAuthorization: Bearer {edge.token()}\r\n"
        await c.send(f"GET /sse HTTP/1.1\r\n{head}\r\nGET /echo HTTP/1.1\r\n{head}\r\n".encode())
        await asyncio.sleep(0.2)  # the second request is parsed and queued behind the stream
        edge.backend.vms[VM].state = VmState.SUSPENDED
        edge.ctx.pool.drop_vm(VM)  # what the manager's listener does
        upstream.state["sse_go"].set()
        first, second = await c.response(), await c.response()
        assert (first.status, second.status) == (200, 200)
        assert edge.backend.ensure_calls == 1, "the queued request woke the VM instead of failing"
        c.close()
    finally:
        await edge.close()


async def test_requests_in_flight_end_when_their_vm_goes_away(upstream: Upstream) -> None:
    edge = await _edge(upstream.port, state=VmState.RUNNING)
    try:
        c = await edge.connect()
        await c.send(
            f"GET /sse HTTP/1.1\r\nHost: {edge.host()}\r\nAuthorization: Bearer {edge.token()}\r\n\r\n".encode()
        )
        status, _ = await c.head()
        assert status == 200 and edge.ctx.open_streams == {VM: 1}
        edge.ctx.pool.abort_vm(VM)  # the VM was suspended or deleted under the stream
        assert await asyncio.wait_for(c.reader.read(), 5) is not None  # the client sees the end, no hang
        async with asyncio.timeout(5):
            while edge.ctx.open_streams:
                await asyncio.sleep(0.01)
        upstream.state["sse_go"].set()
    finally:
        await edge.close()
