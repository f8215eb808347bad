"""The egress proxy on 127.0.0.1 (the namespace variant is covered end to end): targets are local servers."""

import asyncio
import io
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import orjson
import pytest

from vmm import jsonlog
from vmm.network.egress import EgressPolicy
from vmm.network.egress_proxy import EgressLimits, EgressProxy

STEP = 5.0  # no read in these tests waits longer
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextmanager
def captured_log() -> Iterator[list[dict]]:
    out = io.StringIO()
    events: list[dict] = []
    jsonlog.configure("info", out)
    try:
        yield events
    finally:
        jsonlog.configure("info", None)
        events.extend(orjson.loads(line) for line in out.getvalue().splitlines())


@asynccontextmanager
async def running_proxy(rules: object, limits: EgressLimits | None = None) -> AsyncIterator[tuple[EgressProxy, int]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    counted: Counter[str] = Counter()
    policy = EgressPolicy.from_json(rules)
    proxy = EgressProxy("vtest", policy, sock, lambda ok: counted.update([_decision(ok)]), limits)
    _COUNTED[id(proxy)] = counted
    await proxy.start()
    try:
        yield proxy, sock.getsockname()[1]
    finally:
        await proxy.stop()


@asynccontextmanager
async def local_server(handler: Handler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


_COUNTED: dict[int, Counter[str]] = {}  # each running proxy's attempts, as its count callback heard them


def _decision(allowed: bool) -> str:
    return "allowed" if allowed else "denied"


def attempts(proxy: EgressProxy, decision: str) -> int:
    return _COUNTED[id(proxy)][decision]


async def ask(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def answer(port: int, data: bytes) -> bytes:
    """Everything the proxy sends back until it closes."""
    reader, writer = await ask(port, data)
    try:
        async with asyncio.timeout(STEP):
            return await reader.read(-1)
    finally:
        writer.close()


async def test_connect_tunnels_bytes_both_ways_and_is_logged() -> None:
    with captured_log() as events:
        async with local_server(echo) as target, running_proxy([f"127.0.0.1:{target}"]) as (proxy, port):
            reader, writer = await ask(port, f"CONNECT 127.0.0.1:{target} HTTP/1.1\r\n\r\nearly".encode())
            async with asyncio.timeout(STEP):
                assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection established\r\n\r\n"
                assert await reader.readexactly(5) == b"early"
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                writer.write_eof()  # the half-close reaches the target, which closes in turn
                assert await reader.read(-1) == b""
            writer.close()
            assert attempts(proxy, "allowed") == 1 and attempts(proxy, "denied") == 0
    allowed = next(e for e in events if e["event"] == "egress.allowed")
    assert allowed["vm"] == "vtest" and allowed["host"] == "127.0.0.1" and allowed["port"] == target
    closed = next(e for e in events if e["event"] == "egress.closed")
    assert closed["up_bytes"] == 9 and closed["down_bytes"] == 9


async def test_connect_denied_is_403_logged_and_counted() -> None:
    dialled = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dialled.append(1)
        writer.close()

    with captured_log() as events:
        async with local_server(record) as target, running_proxy("none") as (proxy, port):
            reply = await answer(port, f"CONNECT 127.0.0.1:{target} HTTP/1.1\r\n\r\n".encode())
            assert reply.startswith(b"HTTP/1.1 403 Forbidden\r\n") and b"not allowed" in reply
            assert attempts(proxy, "denied") == 1 and attempts(proxy, "allowed") == 0
    assert not dialled
    denied = [e for e in events if e["event"] == "egress.denied"]
    assert len(denied) == 1 and denied[0]["host"] == "127.0.0.1" and denied[0]["port"] == target


async def test_plain_request_is_forwarded_in_origin_form_without_hop_by_hop_headers() -> None:
    heads: list[bytes] = []

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        body = await reader.readexactly(5)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\ngot " + body[:3])
        await writer.drain()
        writer.close()

    async with local_server(origin) as target, running_proxy([f"127.0.0.1:{target}"]) as (proxy, port):
        reply = await answer(
            port,
            f"POST http://127.0.0.1:{target}/p?q=1 HTTP/1.1\r\nHost: elsewhere\r\nProxy-Authorization: Basic eA==\r\n"
            "Proxy-Connection: keep-alive\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nX-App: yes\r\n"
            "Content-Length: 5\r\n\r\nhello".encode(),
        )
        assert reply.endswith(b"\r\n\r\ngot hel") and reply.startswith(b"HTTP/1.1 200 OK\r\n")
        assert attempts(proxy, "allowed") == 1
    assert heads == [
        f"POST /p?q=1 HTTP/1.1\r\nHost: 127.0.0.1:{target}\r\nX-App: yes\r\nContent-Length: 5\r\n"
        "Connection: close\r\n\r\n".encode()
    ]


async def test_a_chunked_body_is_relayed_as_it_comes() -> None:
    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.readuntil(b"0\r\n\r\n")
        assert b"Transfer-Encoding: chunked\r\n" in head
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    async with local_server(origin) as target, running_proxy([f"127.0.0.1:{target}"]) as (_, port):
        chunked = b"5\r\nhello\r\n0\r\n\r\n"
        reply = await answer(
            port,
            f"PUT http://127.0.0.1:{target}/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunked,
        )
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(chunked)


async def test_plain_request_denied() -> None:
    async with running_proxy(["127.0.0.1:1"]) as (proxy, port):
        reply = await answer(port, b"GET http://127.0.0.1:2/ HTTP/1.1\r\nHost: 127.0.0.1:2\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 403 ") and attempts(proxy, "denied") == 1


async def test_unreachable_target_is_502() -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    with captured_log() as events:
        async with running_proxy([f"127.0.0.1:{dead}"]) as (_, port):
            reply = await answer(port, f"CONNECT 127.0.0.1:{dead} HTTP/1.1\r\n\r\n".encode())
            assert reply.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    allowed = next(e for e in events if e["event"] == "egress.allowed")
    assert allowed["status"] == 502 and "cannot connect" in allowed["error"]


async def test_names_resolving_to_non_public_addresses_are_refused() -> None:
    async with local_server(echo) as target, running_proxy([f"localhost:{target}"]) as (proxy, port):
        reply = await answer(port, f"CONNECT localhost:{target} HTTP/1.1\r\n\r\n".encode())
        assert reply.startswith(b"HTTP/1.1 403 ") and b"non-public" in reply
        assert attempts(proxy, "denied") == 1


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET http://a.example/ HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
        (b"GET /origin-form HTTP/1.1\r\n\r\n", b"400"),
        (b"GET https://a.example/ HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT a.example HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT a.example:99999 HTTP/1.1\r\n\r\n", b"400"),
        (b"GET http://a.example/ HTTP/1.1\r\nbad header\r\n\r\n", b"400"),
        (b"GET http://a.example/ HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
        (b"GARBAGE\r\n\r\n", b"400"),
    ],
)
async def test_bad_heads_are_refused(request_bytes: bytes, status: bytes) -> None:
    async with running_proxy(["*.example:*", "a.example:*"]) as (proxy, port):
        reply = await answer(port, request_bytes)
        assert reply.startswith(b"HTTP/1.1 " + status + b" ") and attempts(proxy, "denied") == 1


async def test_slow_head_times_out() -> None:
    async with running_proxy("none", EgressLimits(head_timeout=0.2)) as (_, port):
        assert (await answer(port, b"GET http://a.example/")).startswith(b"HTTP/1.1 408 ")


async def test_idle_tunnel_is_closed() -> None:
    async with (
        local_server(echo) as target,
        running_proxy([f"127.0.0.1:{target}"], EgressLimits(idle_timeout=0.2)) as (_, port),
    ):
        reply = await answer(port, f"CONNECT 127.0.0.1:{target} HTTP/1.1\r\n\r\n".encode())
        assert reply == b"HTTP/1.1 200 Connection established\r\n\r\n"


async def test_connections_are_capped_and_stop_closes_them_all() -> None:
    async with (
        local_server(echo) as target,
        running_proxy([f"127.0.0.1:{target}"], EgressLimits(max_connections=1)) as (proxy, port),
    ):
        reader, writer = await ask(port, f"CONNECT 127.0.0.1:{target} HTTP/1.1\r\n\r\n".encode())
        async with asyncio.timeout(STEP):
            await reader.readuntil(b"\r\n\r\n")
        refused = await answer(port, f"CONNECT 127.0.0.1:{target} HTTP/1.1\r\n\r\n".encode())
        assert refused.startswith(b"HTTP/1.1 503 ") and attempts(proxy, "denied") == 1
        await proxy.stop()
        async with asyncio.timeout(STEP):
            assert await reader.read(-1) == b""
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
