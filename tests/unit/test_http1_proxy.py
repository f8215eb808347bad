"""The edge's HTTP/1.1 proxy over real sockets on 127.0.0.1: routing, tokens, rewriting,
keep-alive and message framing."""

from __future__ import annotations

import asyncio
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web

from edge.tls import make_dev_cert, server_context
from tests.unit.proxy_harness import (
    CONTROL,
    DOMAIN,
    OTHER_VM,
    VM,
    Edge,
    FakeBackend,
    Upstream,
    edge_over_raw,
    start_edge,
)


@pytest.fixture
async def edge(upstream: Upstream) -> AsyncIterator[Edge]:
    backend = FakeBackend()
    backend.add_vm(VM, upstream.port, ports=(3000,))
    backend.targets[(VM, 3000)] = upstream.port
    backend.add_vm(OTHER_VM, upstream.port)
    e = await start_edge(backend)
    yield e
    await e.close()


def _headers(doc: dict) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for k, v in doc["headers"]:
        seen.setdefault(k.lower(), []).append(v)
    return seen


async def test_proxies_a_request_with_a_bearer_token(edge: Edge) -> None:
    c = await edge.connect()
    resp = await c.get("/echo?a=1", edge.host(), {"Authorization": f"Bearer {edge.token()}"})
    assert resp.status == 200
    doc = resp.json()
    assert doc["target"] == "/echo?a=1"
    seen = _headers(doc)
    assert "authorization" not in seen  # the edge's token never reaches the VM
    assert seen["host"] == [edge.host()]
    assert edge.backend.touches[VM] == 1
    assert edge.count(200) == 1
    assert edge.ctx.open_streams == {}
    c.close()


@pytest.mark.parametrize(
    ("host", "status"),
    [("elsewhere.example", 404), ("vmnothere1.edge.test", 404), ("9999-vmalpha1.edge.test", 403)],
)
async def test_routing_errors_are_json(edge: Edge, host: str, status: int) -> None:
    c = await edge.connect()
    vm_id = host.split(".")[0].rpartition("-")[2]  # a token for the VM the host names
    resp = await c.get("/echo", host, {"Authorization": f"Bearer {edge.token(vm_id)}"})
    assert resp.status == status
    assert resp.header("Content-Type") == "application/json"
    assert resp.json()["error"] in ("not_found", "forbidden")
    # The state is known, so the connection stays usable.
    again = await c.get("/echo", edge.host(), {"Authorization": f"Bearer {edge.token()}"})
    assert again.status == 200
    c.close()


async def test_allowed_extra_port_is_reachable(edge: Edge) -> None:
    c = await edge.connect()
    resp = await c.get("/echo", edge.host(port=3000), {"Authorization": f"Bearer {edge.token()}"})
    assert resp.status == 200
    c.close()


async def test_token_reasons(edge: Edge) -> None:
    c = await edge.connect()
    cases = {
        "missing": {},
        "wrong_vm": {"Authorization": f"Bearer {edge.token(OTHER_VM)}"},
        "malformed": {"Authorization": "Bearer not-a-jwt"},
        # a header whose kid is a number: pyjwt rejects it with an exception of its own
        "malformed ": {"Authorization": "Bearer eyJhbGciOiJIUzI1NiIsImtpZCI6NX0.eyJzdWIiOiJ4In0.c2ln"},
        "bad_signature": {"Authorization": f"Bearer {edge.token()[:-3]}AAA"},
    }
    for reason, headers in cases.items():
        resp = await c.get("/echo", edge.host(), headers)
        assert resp.status == 401, reason
        assert resp.header("WWW-Authenticate") == "Bearer"
        doc = resp.json()
        assert doc["error"] == "unauthorized"
        assert doc["reason"] == reason.strip()
        assert doc["message"]
    expiring = edge.token(ttl=10)
    edge.clock[0] += 60
    resp = await c.get("/echo", edge.host(), {"Authorization": f"Bearer {expiring}"})
    assert resp.json()["reason"] == "expired"
    assert edge.backend.touches[VM] == 0
    c.close()


async def test_token_is_scoped_to_its_vm(edge: Edge) -> None:
    c = await edge.connect()
    token = edge.token(OTHER_VM)
    assert (await c.get("/echo", edge.host(OTHER_VM), {"Authorization": f"Bearer {token}"})).status == 200
    assert (await c.get("/echo", edge.host(VM), {"Authorization": f"Bearer {token}"})).status == 401
    c.close()


async def test_query_token_sets_cookie_and_is_stripped(edge: Edge) -> None:
    c = await edge.connect()
    token = edge.token()
    resp = await c.get(f"/echo?x=1&token={token}&y=2", edge.host())
    assert resp.status == 200
    cookie = resp.header("Set-Cookie")
    assert cookie is not None and cookie.startswith(f"mvm_token={token};")
    assert "HttpOnly" in cookie and "Max-Age=" in cookie
    assert resp.json()["target"] == "/echo?x=1&y=2"
    # The browser sends the cookie back; the VM sees its own cookies only.
    resp = await c.get("/cookies", edge.host(), {"Cookie": f"a=1; mvm_token={token}; b=2"})
    assert resp.status == 200
    assert resp.json() == {"cookie": "a=1; b=2"}
    assert resp.header("Set-Cookie") == "app=1; Path=/"  # the VM's own, untouched
    c.close()


async def test_query_token_cookie_on_a_head_request(edge: Edge) -> None:
    c = await edge.connect()
    resp = await c.get(f"/echo?token={edge.token()}", edge.host(), method="HEAD")
    assert resp.status == 200
    assert resp.header(
        "Set-Cookie",
    ).startswith("mvm_token=")  # type: ignore[union-attr]
    assert (await c.get("/echo", edge.host(), {"Authorization": f"Bearer {edge.token()}"})).status == 200
    c.close()


async def test_hop_by_hop_headers_removed_and_forwarded_headers_set(edge: Edge) -> None:
    c = await edge.connect()
    headers = {
        "Authorization": f"Bearer {edge.token()}",
        "Connection": "keep-alive, X-Secret",
        "Keep-Alive": "timeout=5",
        "X-Secret": "hop",
        "TE": "trailers",
        "Proxy-Connection": "keep-alive",
        "Upgrade": "something",
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "gopher",
        "X-Forwarded-Host": "evil.example",
        "X-Kept": "yes",
    }
    doc = (await c.get("/echo", edge.host(), headers)).json()
    seen = _headers(doc)
    for name in ("connection", "keep-alive", "x-secret", "te", "proxy-connection", "upgrade", "authorization"):
        assert name not in seen, name
    assert seen["x-forwarded-for"] == ["127.0.0.1"]  # the client's own claim is replaced
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["x-forwarded-host"] == [edge.host()]
    assert seen["x-kept"] == ["yes"]
    c.close()


async def test_basic_authorization_passes_when_token_comes_from_cookie(edge: Edge) -> None:
    c = await edge.connect()
    headers = {"Authorization": "Basic dXNlcjpwdw==", "Cookie": f"mvm_token={edge.token()}"}
    seen = _headers((await c.get("/echo", edge.host(), headers)).json())
    assert seen["authorization"] == ["Basic dXNlcjpwdw=="]
    assert "cookie" not in seen
    c.close()


async def test_pooled_upstream_is_not_reused_after_its_vm_stopped(edge: Edge, upstream: Upstream) -> None:
    c = await edge.connect()
    auth = {"Authorization": f"Bearer {edge.token()}"}
    assert (await c.get("/echo", edge.host(), auth)).status == 200
    edge.ctx.pool.drop_vm(VM)  # what the manager's listener does when a VM pauses or suspends
    assert (await c.get("/echo", edge.host(), auth)).status == 200
    assert edge.backend.opened == 2
    c.close()


async def test_keep_alive_reuses_one_upstream_connection(edge: Edge, upstream: Upstream) -> None:
    c = await edge.connect()
    auth = {"Authorization": f"Bearer {edge.token()}"}
    for i in range(5):
        resp = await c.get(f"/echo?i={i}", edge.host(), auth)
        assert resp.json()["target"] == f"/echo?i={i}"
    assert edge.backend.opened == 1
    assert len(upstream.peers) == 1
    assert edge.backend.touches[VM] == 1, "a keep-alive client's requests count as activity once a second"
    # Between requests the client holds no upstream: it waits in the shared pool, for anyone.
    assert edge.ctx.pool.idle_count(VM) == 1
    c2 = await edge.connect()
    assert (await c2.get("/echo", edge.host(), auth)).status == 200
    assert edge.backend.opened == 1
    assert edge.ctx.pool.idle_count(VM) == 1
    c.close()
    c2.close()


async def test_idle_keep_alive_clients_hold_no_guest_connections(edge: Edge, upstream: Upstream) -> None:
    """Many keep-alive clients idling between requests share the pool's few connections."""
    auth = {"Authorization": f"Bearer {edge.token()}"}
    pool = edge.ctx.pool
    pool.surplus_grace = 0.1
    clients = [await edge.connect() for _ in range(40)]
    await asyncio.gather(*(c.get("/echo", edge.host(), auth) for c in clients))
    await _until(lambda: pool.live_count(VM) <= pool.per_vm)  # "idle clients pin no upstream" past the grace
    assert pool.idle_count(VM) <= pool.per_vm
    for c in clients:  # and each one goes on working, on a pooled or a new connection
        assert (await c.get("/echo", edge.host(), auth)).status == 200
        c.close()


async def test_concurrent_requests_past_the_pool_bound_reuse_their_connections(edge: Edge, upstream: Upstream) -> None:
    """More requests in flight than the bound: their connections come back and are taken again,
    not closed and reopened for every other request."""
    auth = {"Authorization": f"Bearer {edge.token()}"}
    pool = edge.ctx.pool
    pool.surplus_grace = 30.0  # longer than the test: the bursts below follow each other at once
    clients = [await edge.connect() for _ in range(3 * pool.per_vm)]
    await asyncio.gather(*(c.get("/echo", edge.host(), auth) for c in clients))
    opened = edge.backend.opened
    assert opened > pool.per_vm and pool.idle_count(VM) == opened
    for _ in range(3):
        responses = await asyncio.gather(*(c.get("/echo", edge.host(), auth) for c in clients))
        assert [r.status for r in responses] == [200] * len(clients)
    assert edge.backend.opened == opened
    for c in clients:
        c.close()


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_pipelined_requests_are_answered_in_order(edge: Edge) -> None:
    c = await edge.connect()
    auth = f"Authorization: Bearer {edge.token()}\r\n"
    burst = b"".join(
        f"GET /echo?n={n} HTTP/1.1\r\nHost: {edge.host()}\r\n{auth if n != 2 else ''}\r\n".encode() for n in range(4)
    )
    await c.send(burst)
    statuses = []
    for n in range(4):
        resp = await c.response()
        statuses.append(resp.status)
        if resp.status == 200:
            assert resp.json()["target"] == f"/echo?n={n}"
    assert statuses == [200, 200, 401, 200]
    c.close()


async def test_connection_close_from_client_is_honoured(edge: Edge) -> None:
    c = await edge.connect()
    resp = await c.get("/echo", edge.host(), {"Authorization": f"Bearer {edge.token()}", "Connection": "close"})
    assert resp.status == 200
    assert await c.closed()


async def test_http10_client(edge: Edge) -> None:
    c = await edge.connect()
    await c.send(f"GET /echo HTTP/1.0\r\nHost: {edge.host()}\r\nAuthorization: Bearer {edge.token()}\r\n\r\n".encode())
    resp = await c.response()
    assert resp.status == 200
    assert await c.closed()


async def test_chunked_request_body_is_rechunked(edge: Edge) -> None:
    c = await edge.connect()
    head = f"POST /echo HTTP/1.1\r\nHost: {edge.host()}\r\nAuthorization: Bearer {edge.token()}\r\n"
    await c.send((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
    await c.send(b"5\r\nhello\r\n")
    await c.send(b"6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    doc = (await c.response()).json()
    assert doc["body"] == "hello world"
    assert _headers(doc)["transfer-encoding"] == ["chunked"]
    resp = await c.get("/echo", edge.host(), {"Authorization": f"Bearer {edge.token()}"})
    assert resp.status == 200
    c.close()


async def test_content_length_body_and_chunked_response(edge: Edge) -> None:
    c = await edge.connect()
    auth = f"Authorization: Bearer {edge.token()}\r\n"
    await c.send(f"POST /echo HTTP/1.1\r\nHost: {edge.host()}\r\n{auth}Content-Length: 3\r\n\r\nabc".encode())
    assert (await c.response()).json()["body"] == "abc"
    resp = await c.get("/download?size=200000", edge.host(), {"Authorization": f"Bearer {edge.token()}"})
    assert resp.header("Transfer-Encoding") == "chunked"
    assert resp.body == (bytes(range(256)) * 1000)[:200000]
    assert (await c.get("/echo", edge.host(), {"Authorization": f"Bearer {edge.token()}"})).status == 200
    assert edge.backend.opened == 1
    c.close()


async def test_expect_100_continue_passes_through(edge: Edge) -> None:
    c = await edge.connect()
    head = f"POST /echo HTTP/1.1\r\nHost: {edge.host()}\r\nAuthorization: Bearer {edge.token()}\r\n"
    await c.send((head + "Content-Length: 4\r\nExpect: 100-continue\r\n\r\n").encode())
    interim = await c.response()
    assert interim.status == 100
    await c.send(b"body")
    doc = (await c.response()).json()
    assert doc["body"] == "body"
    c.close()


async def test_expect_100_continue_refused_by_the_edge(edge: Edge) -> None:
    c = await edge.connect()
    head = f"POST /echo HTTP/1.1\r\nHost: {edge.host()}\r\n"
    await c.send((head + "Content-Length: 4\r\nExpect: 100-continue\r\n\r\n").encode())
    resp = await c.response()
    assert resp.status == 401
    assert resp.header("Connection") == "close"  # the body it announced never came
    assert await c.closed()


async def test_head_204_and_304_have_no_body(edge: Edge) -> None:
    c = await edge.connect()
    auth = {"Authorization": f"Bearer {edge.token()}"}
    head = await c.get("/echo", edge.host(), auth, method="HEAD")
    assert head.status == 200 and int(head.header("Content-Length") or 0) > 0
    assert (await c.get("/status/204", edge.host(), auth)).status == 204
    assert (await c.get("/status/304", edge.host(), auth)).status == 304
    assert (await c.get("/echo", edge.host(), auth)).json()["method"] == "GET"
    c.close()


async def test_error_answer_to_head_has_no_body(edge: Edge) -> None:
    c = await edge.connect()
    resp = await c.get("/echo", edge.host(), method="HEAD")
    assert resp.status == 401 and int(resp.header("Content-Length") or 0) > 0
    assert (await c.get("/echo", edge.host(), {"Authorization": f"Bearer {edge.token()}"})).status == 200
    c.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: vmalpha1.edge.test\r\nHost: vmbeta22.edge.test\r\n\r\n",
    ],
)
async def test_malformed_requests_get_400_and_close(edge: Edge, raw: bytes) -> None:
    c = await edge.connect()
    await c.send(raw)
    resp = await c.response()
    assert resp.status == 400
    assert resp.json()["error"] == "bad_request"
    if raw.count(b"Host:") < 2:
        assert await c.closed()
    c.close()


async def test_oversized_head_gets_431(edge: Edge) -> None:
    c = await edge.connect()
    await c.send(b"GET / HTTP/1.1\r\nHost: vmalpha1.edge.test\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    resp = await c.response()
    assert resp.status == 431
    assert await c.closed()


async def test_control_host_is_spliced_to_the_unix_socket(upstream: Upstream) -> None:
    seen: dict[str, str | None] = {}

    async def handler(request: web.Request) -> web.Response:
        seen["auth"] = request.headers.get("Authorization")
        seen["xff"] = request.headers.get("X-Forwarded-For")
        return web.json_response({"ok": True, "path": request.path})

    app = web.Application()
    app.router.add_get("/v1/vms", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "control.sock")
        await web.UnixSite(runner, path).start()
        edge = await start_edge(FakeBackend(), control_socket=path)
        try:
            c = await edge.connect()
            for _ in range(2):
                resp = await c.get("/v1/vms", CONTROL, {"Authorization": "Bearer admin-key"})
                assert resp.status == 200 and resp.json() == {"ok": True, "path": "/v1/vms"}
            assert seen == {"auth": "Bearer admin-key", "xff": "127.0.0.1"}
            c.close()
        finally:
            await edge.close()
            await runner.cleanup()


async def test_a_pooled_connection_the_guest_closed_is_not_reused() -> None:
    """A guest that closes each connection after its answer: the edge sees the pooled one is
    no longer established and opens a new one, so no request is lost or sent twice."""
    served: list[int] = []

    async def one_answer_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        served.append(1)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async with edge_over_raw(one_answer_per_connection) as edge:
        c = await edge.connect()
        for _ in range(3):
            assert (await c.get("/", edge.host(), {"Authorization": f"Bearer {edge.token()}"})).body == b"ok"
        assert len(served) == 3 and edge.backend.opened == 3
        c.close()


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_request_the_guest_read_on_a_pooled_connection_is_not_sent_twice(method: str) -> None:
    """The guest read the request on a reused connection and closed without answering: it may
    have run it, so the edge answers 502 instead of sending it again, whatever the method."""
    heads: list[bytes] = []

    async def closes_after_reading_the_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    async with edge_over_raw(closes_after_reading_the_second) as edge:
        c = await edge.connect()
        auth = {"Authorization": f"Bearer {edge.token()}"}
        assert (await c.get("/", edge.host(), auth)).body == b"ok"
        await c.send(
            f"{method} /again HTTP/1.1\r\nHost: {edge.host()}\r\nAuthorization: Bearer {edge.token()}\r\n"
            "Content-Length: 0\r\n\r\n".encode()
        )
        resp = await c.response()
        assert resp.status == 502 and "without answering" in resp.json()["message"]
        assert [h.split(b" ", 2)[:2] for h in heads] == [[b"GET", b"/"], [method.encode(), b"/again"]]
        assert edge.backend.opened == 1
        c.close()


async def test_a_pooled_connection_of_an_earlier_generation_is_not_used(upstream: Upstream) -> None:
    """After a suspend and restore the VM's generation moved on: connections opened before
    reached the QEMU that is gone, so a request goes on a new one."""
    backend = FakeBackend()
    rec = backend.add_vm(VM, upstream.port)
    edge = await start_edge(backend)
    try:
        c = await edge.connect()
        auth = {"Authorization": f"Bearer {edge.token()}"}
        assert (await c.get("/echo", edge.host(), auth)).status == 200
        assert edge.ctx.pool.idle_count(VM) == 1 and backend.opened == 1
        rec.generation += 2
        assert (await c.get("/echo", edge.host(), auth)).status == 200
        assert backend.opened == 2
        c.close()
    finally:
        await edge.close()


async def test_head_trickling_in_is_bounded(edge: Edge) -> None:
    c = await edge.connect()
    await c.send(b"GET / HTTP/1.1\r\nHost: vmalpha1.edge.test\r\nX-Big: ")
    try:
        for _ in range(40):  # one header that never ends, sent in pieces
            await c.send(b"a" * 4096)
            await asyncio.sleep(0.001)
    except ConnectionError:
        pass
    resp = await c.response()
    assert resp.status == 431
    assert await c.closed()


async def test_over_tls(upstream: Upstream, tmp_path: Path) -> None:
    cert, key = make_dev_cert(DOMAIN, tmp_path)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    backend = FakeBackend()
    backend.add_vm(VM, upstream.port)
    edge = await start_edge(backend, tls=(server_context(cert, key), client_ctx))
    try:
        c = await edge.connect()
        auth = {"Authorization": f"Bearer {edge.token()}"}
        for _ in range(3):
            seen = _headers((await c.get("/echo", edge.host(), auth)).json())
            assert seen["x-forwarded-proto"] == ["https"]
        resp = await c.get("/download?size=300000", edge.host(), auth)
        assert len(resp.body) == 300000
        assert edge.backend.opened == 1
        # An answer before the body on TLS (no half-close there): answered, then closed.
        await c.send(f"POST /echo HTTP/1.1\r\nHost: {edge.host()}\r\nContent-Length: 100000\r\n\r\n".encode())
        assert (await c.response()).status == 401
        assert await c.closed()
    finally:
        await edge.close()


@pytest.mark.parametrize("host", ["vmnothere1.edge.test", "9999-vmalpha1.edge.test", "vmalpha1.edge.test"])
async def test_without_a_token_for_that_vm_nothing_about_it_is_revealed(edge: Edge, host: str) -> None:
    c = await edge.connect()
    resp = await c.get("/echo", host, {"Authorization": f"Bearer {edge.token(OTHER_VM)}"})
    assert resp.status == 401 and resp.json()["reason"] == "wrong_vm"
    c.close()


async def test_an_exception_in_admission_still_gets_an_answer(edge: Edge, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(token: str, vm_id: str) -> float:
        raise RuntimeError("a bug in the verifier")

    monkeypatch.setattr(edge.tokens, "grant", broken)
    c = await edge.connect()
    resp = await c.get("/echo", edge.host(), {"Authorization": f"Bearer {edge.token()}"})
    assert resp.status == 400 and resp.json()["message"] == "the request could not be admitted"
    c.close()


async def test_absolute_form_targets_are_rewritten_or_refused(edge: Edge) -> None:
    c = await edge.connect()
    auth = {"Authorization": f"Bearer {edge.token()}"}
    same = await c.get(f"http://{edge.host()}/echo?x=1", edge.host(), auth)
    assert same.status == 200 and same.json()["target"] == "/echo?x=1"
    other = await c.get("http://another-vm.example/echo", edge.host(), auth)
    assert other.status == 400 and "must name the Host" in other.json()["message"]
    c.close()
