"""The edge proxy on 127.0.0.1 in front of local test upstreams, with a fake VM backend."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from edge.h2_conn import make_listener_factory
from edge.hostnames import HostnameRouter
from edge.metrics import Metrics
from edge.proxy_context import ProxyContext, ProxySettings
from edge.tokens import SigningKey, TokenService
from edge.upstream import UpstreamPool
from vmm.model import VmRecord, VmState
from vmm.policy import Policy

DOMAIN = "edge.test"
CONTROL = "api.edge.test"
SECRET = b"0123456789abcdef0123456789abcdef"
VM = "vmalpha1"
OTHER_VM = "vmbeta22"


class FakeBackend:
    """VMs in a dict; guest ports map to local listeners; wakes are scripted."""

    def __init__(self) -> None:
        self.vms: dict[str, VmRecord] = {}
        self.targets: dict[tuple[str, int], int] = {}
        self.ensure_calls = 0
        self.confirm_calls = 0
        self.opened = 0
        self.touches: Counter[str] = Counter()
        self.wake_gate: asyncio.Event | None = None  # a wake waits for it when set
        self.wake_delay = 0.0
        self.wake_error: Exception | None = None
        self.connect_delay = 0.0
        self.unreachable: set[str] = set()  # VMs whose host knows better: connects fail until confirm_running

    def add_vm(self, vm_id: str, target: int, *, app_port: int = 8080, state: VmState = VmState.RUNNING,
               ports: tuple[int, ...] = ()) -> VmRecord:  # fmt: skip
        now = time.time()
        rec = VmRecord(vm_id, "demo", state, Policy(ports=ports), app_port, now, now)
        self.vms[vm_id] = rec
        self.targets[(vm_id, app_port)] = target
        return rec

    def lookup(self, vm_id: str) -> VmRecord | None:
        return self.vms.get(vm_id)

    async def ensure_running(self, vm_id: str) -> bool:
        self.ensure_calls += 1
        rec = self.vms[vm_id]
        if rec.state is VmState.RUNNING:
            return False
        if self.wake_gate is not None:
            await self.wake_gate.wait()
        await asyncio.sleep(self.wake_delay)
        if self.wake_error is not None:
            raise self.wake_error
        rec.state = VmState.RUNNING
        return True

    async def confirm_running(self, vm_id: str) -> bool:
        self.confirm_calls += 1
        if vm_id in self.unreachable:  # the host had suspended it; this wake brings it back
            self.unreachable.discard(vm_id)
            return True
        return await self.ensure_running(vm_id)

    async def open_upstream(self, vm_id: str, port: int, timeout: float) -> socket.socket:
        self.opened += 1
        await asyncio.sleep(self.connect_delay)
        if vm_id in self.unreachable:
            raise OSError(113, "No route to host")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.targets[(vm_id, port)])), timeout
            )
        except BaseException:
            sock.close()
            raise
        return sock

    def touch(self, vm_id: str, at: float | None = None) -> None:
        self.touches[vm_id] += 1


@dataclass
class Upstream:
    """An aiohttp app standing in for a guest; records what it saw."""

    port: int
    runner: web.AppRunner
    peers: set[tuple[str, int]] = field(default_factory=set)
    state: dict[str, Any] = field(default_factory=dict)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def start_upstream() -> Upstream:
    up: Upstream
    sse_go = asyncio.Event()
    upload_go = asyncio.Event()
    progress = {"written": 0, "read": 0}

    async def echo(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            up.peers.add(peer)
        body = await request.read()
        doc = {
            "method": request.method,
            "target": request.raw_path,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "length": len(body),
            "sha": _digest(body),
            "body": body[:200].decode("latin-1"),
        }
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    async def upload(request: web.Request) -> web.Response:
        if request.query.get("wait"):
            await upload_go.wait()
        h = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_any():
            h.update(chunk)
            n += len(chunk)
            progress["read"] = n
        return web.json_response({"length": n, "sha": h.hexdigest()})

    async def download(request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        resp = web.StreamResponse()
        if request.query.get("cl"):
            resp.content_length = size
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        block = bytes(range(256)) * 256  # 64 KiB
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            await resp.write(piece)
            sent += len(piece)
            progress["written"] = sent
        await resp.write_eof()
        return resp

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: one\n\n")
        await sse_go.wait()
        await resp.write(b"data: two\n\n")
        await resp.write_eof()
        return resp

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                await sock.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await sock.send_bytes(msg.data[::-1])
        return sock

    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        return web.Response(status=code, headers={"ETag": '"v1"'} if code == 304 else None)

    async def cookies(request: web.Request) -> web.Response:
        return web.json_response({"cookie": request.headers.get("Cookie")}, headers={"Set-Cookie": "app=1; Path=/"})

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    app.router.add_get("/sse", sse)
    app.router.add_get("/ws", ws)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/cookies", cookies)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    up = Upstream(port, runner)
    up.state.update(sse_go=sse_go, upload_go=upload_go, progress=progress)
    return up


@dataclass
class Edge:
    ctx: ProxyContext
    server: asyncio.Server
    port: int
    backend: FakeBackend
    tokens: TokenService
    clock: list[float]
    clients: list[Client] = field(default_factory=list)
    client_ssl: ssl.SSLContext | None = None

    def token(self, vm_id: str = VM, ttl: float = 300) -> str:
        return self.tokens.issue(vm_id, ttl)[0]

    def host(self, vm_id: str = VM, port: int | None = None) -> str:
        return f"{vm_id}.{DOMAIN}" if port is None else f"{port}-{vm_id}.{DOMAIN}"

    def count(self, status: int) -> float:
        value = self.ctx.metrics.registry.get_sample_value("mvm_requests_total", {"status": str(status)})
        return value or 0.0

    async def connect(self) -> Client:
        if self.client_ssl is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        else:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", self.port, ssl=self.client_ssl, server_hostname=self.host()
            )
        client = Client(reader, writer)
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            client.close()
        self.server.close()
        await self.server.wait_closed()
        self.ctx.pool.close()
        self.ctx.trimmer.close()
        await asyncio.sleep(0)  # let transports finish closing


async def start_edge(
    backend: FakeBackend,
    control_socket: str = "",
    tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None,
    **settings: Any,
) -> Edge:
    """The proxy on an ephemeral port; `tls` is (server context, client context)."""
    clock = [time.time()]
    tokens = TokenService([SigningKey("k1", "HS256", secret=SECRET)], "k1", clock=lambda: clock[0])
    ctx = ProxyContext(
        backend=backend,
        router=HostnameRouter(DOMAIN, CONTROL),
        tokens=tokens,
        metrics=Metrics(),
        pool=UpstreamPool(per_vm=8, idle_timeout=30.0),
        control_socket=control_socket,
        settings=ProxySettings(**settings),
    )
    loop = asyncio.get_running_loop()
    server_ssl, client_ssl = tls or (None, None)
    server = await loop.create_server(
        make_listener_factory(ctx, server_ssl is not None), "127.0.0.1", 0, ssl=server_ssl
    )
    port = server.sockets[0].getsockname()[1]
    return Edge(ctx, server, port, backend, tokens, clock, client_ssl=client_ssl)


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def json(self) -> Any:
        return orjson.loads(self.body)


class Client:
    """A raw HTTP/1.1 client: exact bytes out, responses parsed just enough."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def get(self, target: str, host: str, headers: dict[str, str] | None = None, method: str = "GET") -> Response:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
        await self.send(("\r\n".join(lines) + "\r\n\r\n").encode())
        return await self.response(head_only=method == "HEAD")

    async def head(self) -> tuple[int, list[tuple[str, str]]]:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = [tuple(line.split(": ", 1)) for line in lines[1:] if line]
        return status, headers  # type: ignore[return-value]

    async def response(self, head_only: bool = False) -> Response:
        status, headers = await self.head()
        resp = Response(status, headers, b"")
        if head_only or status in (204, 304) or 100 <= status < 200:
            return resp
        te = resp.header("Transfer-Encoding")
        cl = resp.header("Content-Length")
        if te and "chunked" in te.lower():
            body = bytearray()
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                body += await self.reader.readexactly(size)
                await self.reader.readexactly(2)
            resp.body = bytes(body)
        elif cl is not None:
            resp.body = await asyncio.wait_for(self.reader.readexactly(int(cl)), 10)
        else:
            resp.body = await asyncio.wait_for(self.reader.read(), 10)
        return resp

    async def closed(self) -> bool:
        """True when the server closed the connection (EOF or reset) within a few seconds."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), 5)
        except ConnectionError:
            return True
        return rest == b""

    def close(self) -> None:
        self.writer.close()


class RawServer:
    """A plain asyncio TCP server on 127.0.0.1 running `handler(reader, writer)`."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError):
            await self.handler(reader, writer)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()


async def raw_server(handler: Any) -> tuple[RawServer, int]:
    raw = RawServer(handler)
    raw.server = await asyncio.start_server(raw._serve, "127.0.0.1", 0)
    return raw, raw.server.sockets[0].getsockname()[1]


@asynccontextmanager
async def edge_over_raw(handler: Any, **settings: Any) -> AsyncIterator[Edge]:
    """An edge whose one running VM is served by `handler`, a raw asyncio stream handler."""
    server, port = await raw_server(handler)
    backend = FakeBackend()
    backend.add_vm(VM, port)
    edge = await start_edge(backend, **settings)
    try:
        yield edge
    finally:
        await edge.close()
        server.close()
