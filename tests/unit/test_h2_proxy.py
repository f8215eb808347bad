"""HTTP/2 toward clients over real sockets on 127.0.0.1 (h2c and TLS with ALPN), with a fake VM
backend: admission as HTTP/1.1's, per-stream waking, flow control, drain, and the limits."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame

from edge.h2_settings import Http2Settings
from edge.tls import make_dev_cert, server_context
from tests.unit.h2_client import H2Client
from tests.unit.proxy_harness import VM, Edge, FakeBackend, Upstream, start_edge
from vmm.model import VmState

H2C = Http2Settings(h2c=True)


@pytest.fixture
async def edge(upstream: Upstream) -> AsyncIterator[Edge]:
    backend = FakeBackend()
    backend.add_vm(VM, upstream.port, ports=(3000,))
    e = await start_edge(backend, http2=H2C, forwarded_proto="http")
    yield e
    await e.close()


async def _client(edge: Edge) -> H2Client:
    return await H2Client.open(edge.port)


async def test_h2c_request_is_admitted_and_translated(edge: Edge) -> None:
    c = await _client(edge)
    ans = await c.get(edge.host(), "/echo/x?a=1", headers={"authorization": f"Bearer {edge.token()}", "cookie": "a=1"})
    assert ans.status == 200
    doc = orjson.loads(ans.body)
    assert doc["target"] == "/echo/x?a=1"
    seen = {k.lower(): v for k, v in doc["headers"]}
    assert seen["host"] == edge.host()
    assert "authorization" not in seen  # the edge's token never reaches the guest
    assert seen["x-forwarded-proto"] == "http"
    assert edge.ctx.metrics.registry.get_sample_value("mvm_requests_by_protocol_total", {"protocol": "h2"}) == 1
    await c.close()


async def test_a_small_answer_ends_with_its_data_and_the_token_cookie_is_never_indexed(edge: Edge) -> None:
    c = await _client(edge)
    ans = await c.get(edge.host(), f"/echo?token={edge.token()}")
    assert ans.status == 200
    frames = [f for f in c.frames if f.stream_id == 1]
    assert isinstance(frames[0], HeadersFrame) and all(isinstance(f, DataFrame) for f in frames[1:])
    last = frames[-1]
    assert isinstance(last, DataFrame) and "END_STREAM" in last.flags and last.data, "no empty DATA frame to end it"
    cookie = next(f for f in ans.fields if f[0] == b"set-cookie")
    assert isinstance(cookie, NeverIndexedHeaderTuple), "the token's cookie stays out of HPACK's table"
    await c.close()


async def test_tokens_in_query_and_cookie_and_refusals(edge: Edge) -> None:
    c = await _client(edge)
    ans = await c.get(edge.host(), f"/echo?token={edge.token()}")
    assert ans.status == 200
    assert b"mvm_token=" in ans.headers[b"set-cookie"]
    assert "token=" not in orjson.loads(ans.body)["target"]
    ans = await c.get(edge.host(), "/echo", headers={"cookie": f"mvm_token={edge.token()}"})
    assert ans.status == 200
    ans = await c.get(edge.host(), "/echo")
    assert ans.status == 401 and ans.headers[b"www-authenticate"] == b"Bearer"
    ans = await c.get(edge.host(port=3001), "/echo", headers={"authorization": f"Bearer {edge.token()}"})
    assert ans.status == 403
    ans = await c.get("nowhere.example", "/")
    assert ans.status == 404 and orjson.loads(ans.body)["error"] == "not_found"
    await c.close()


async def test_upload_without_length_goes_chunked_and_download_streams(edge: Edge) -> None:
    c = await _client(edge)
    auth = {"authorization": f"Bearer {edge.token()}"}
    body = bytes(range(256)) * 4096 * 3  # 3 MiB: many windows' worth
    ans = await c.get(edge.host(), "/upload", method="POST", headers=auth, body=body)
    assert ans.status == 200
    assert orjson.loads(ans.body) == {"length": len(body), "sha": hashlib.sha256(body).hexdigest()}
    ans = await c.get(edge.host(), "/download?size=5000000", headers=auth)
    assert ans.status == 200 and len(ans.body) == 5_000_000
    await c.close()


async def test_streams_wait_for_one_wake(edge: Edge) -> None:
    edge.backend.vms[VM].state = VmState.SUSPENDED
    gate = edge.backend.wake_gate = asyncio.Event()
    c = await _client(edge)
    auth = {"authorization": f"Bearer {edge.token()}"}
    sids = [c.request(edge.host(), f"/echo/{i}", headers=auth) for i in range(50)]
    await asyncio.sleep(0.05)
    assert not any(c.answers[s].done.is_set() for s in sids)
    gate.set()
    answers = [await c.answer(s) for s in sids]
    assert [a.status for a in answers] == [200] * 50
    assert edge.backend.ensure_calls == 1
    await c.close()


async def test_too_many_streams_are_refused_not_the_connection(upstream: Upstream) -> None:
    backend = FakeBackend()
    backend.add_vm(VM, upstream.port)
    edge = await start_edge(backend, http2=Http2Settings(h2c=True, max_concurrent_streams=4))
    backend.vms[VM].state = VmState.SUSPENDED
    gate = backend.wake_gate = asyncio.Event()
    c = await _client(edge)
    auth = {"authorization": f"Bearer {edge.token()}"}
    sids = [c.request(edge.host(), "/echo", headers=auth) for _ in range(6)]
    await asyncio.sleep(0.1)
    gate.set()
    answers = [await c.answer(s) for s in sids]
    assert [a.status for a in answers[:4]] == [200] * 4
    assert [a.reset for a in answers[4:]] == [7, 7]  # REFUSED_STREAM
    await c.close()
    await edge.close()


async def test_drain_sends_goaway_and_answers_open_streams(edge: Edge) -> None:
    edge.backend.vms[VM].state = VmState.SUSPENDED
    gate = edge.backend.wake_gate = asyncio.Event()
    c = await _client(edge)
    sid = c.request(edge.host(), "/echo", headers={"authorization": f"Bearer {edge.token()}"})
    await asyncio.sleep(0.05)
    for client in list(edge.ctx.clients):
        client.drain()
    gate.set()
    await asyncio.wait_for(c.closed.wait(), 5)  # h2 as a client stops at the first GOAWAY: frames tell
    kinds = [(type(f).__name__, f.stream_id, sorted(f.flags)) for f in c.frames]
    goaways = [f for f in c.frames if isinstance(f, GoAwayFrame)]
    assert goaways[0].last_stream_id == sid and goaways[0].error_code == 0
    assert kinds.index(("GoAwayFrame", 0, [])) < kinds.index(("HeadersFrame", sid, ["END_HEADERS"]))
    assert ("DataFrame", sid, ["END_STREAM"]) in kinds
    await c.close()


async def test_alpn_picks_h2_over_tls_and_http11_still_works(upstream: Upstream) -> None:
    backend = FakeBackend()
    backend.add_vm(VM, upstream.port)
    with tempfile.TemporaryDirectory() as d:
        cert, key = make_dev_cert("edge.test", Path(d))
        client_ctx = ssl.create_default_context(cafile=str(cert))
        client_ctx.set_alpn_protocols(["h2"])
        edge = await start_edge(backend, tls=(server_context(cert, key, h2=True), client_ctx))
        c = await H2Client.open(edge.port, client_ctx, edge.host())
        ans = await c.get(edge.host(), "/echo", headers={"authorization": f"Bearer {edge.token()}"})
        assert ans.status == 200
        await c.close()
        h1_ctx = ssl.create_default_context(cafile=str(cert))
        edge.client_ssl = h1_ctx
        h1 = await edge.connect()
        resp = await h1.get("/echo", edge.host(), {"Authorization": f"Bearer {edge.token()}"})
        assert resp.status == 200
        await edge.close()


async def test_a_client_that_reads_nothing_holds_back_the_guest(edge: Edge, upstream: Upstream) -> None:
    """Guest -> client: past the client's window the edge keeps at most `stream_buffer` per stream,
    then reads the guest no further."""
    c = await H2Client.open(edge.port, window=65535)
    c.auto_ack = False
    sid = c.request(edge.host(), "/download?size=200000000", headers={"authorization": f"Bearer {edge.token()}"})
    await asyncio.sleep(1.0)
    (core,) = [client.core for client in edge.ctx.clients]  # type: ignore[attr-defined]
    stream = core.streams[sid]
    assert len(stream.pending) <= H2C.stream_buffer + 1024 * 1024  # plus at most one read from the guest
    written = upstream.state["progress"]["written"]
    await asyncio.sleep(0.5)
    assert upstream.state["progress"]["written"] == written, "the guest is held back"
    assert written < 50_000_000
    await c.close()


async def test_a_guest_that_reads_nothing_holds_back_the_client(edge: Edge, upstream: Upstream) -> None:
    """Client -> guest: body bytes are acknowledged only as they go on, so the client stops sending."""
    c = await _client(edge)
    body = b"x" * 50_000_000
    sid = c.request(edge.host(), "/upload?wait=1", method="POST", headers={"authorization": f"Bearer {edge.token()}"},
                    body=body)  # fmt: skip
    await asyncio.sleep(1.0)
    left = len(c._outgoing[sid])
    await asyncio.sleep(0.5)
    assert len(c._outgoing[sid]) == left > 30_000_000, "the client is held back by its window"
    upstream.state["upload_go"].set()
    ans = await c.answer(sid, timeout=60)
    assert ans.status == 200 and orjson.loads(ans.body)["length"] == len(body)
    await c.close()


async def test_an_answer_that_ends_with_its_connection_ends_the_stream(edge: Edge) -> None:
    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it, then the end")
        writer.close()

    server = await asyncio.start_server(guest, "127.0.0.1", 0)
    edge.backend.targets[(VM, 3000)] = server.sockets[0].getsockname()[1]
    c = await _client(edge)
    ans = await c.get(edge.host(port=3000), "/", headers={"authorization": f"Bearer {edge.token()}"})
    assert (ans.status, bytes(ans.body), ans.reset) == (200, b"all of it, then the end", None)
    await c.close()
    server.close()
