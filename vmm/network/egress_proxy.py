"""Egress proxies, one per VM: a guest's only way out, as its egress policy allows.

Guests have no route out of their namespace. Init points HTTP(S)_PROXY at 10.77.0.1:3128,
where this server listens on a socket made inside the VM's namespace (vmm.network.netns.listen_in),
so only that guest reaches it and the server knows which VM asks without any credential.
It dials out from the edge's own (root) namespace, resolving names on the event loop, and
refuses names that resolve to non-public addresses so a guest cannot reach the host's
loopback services. It speaks just enough HTTP/1.1 for proxy clients: `CONNECT host:port`
(a byte tunnel, used for HTTPS) and absolute-form plain HTTP requests, one per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..jsonlog import log
from . import netns
from .egress import EgressPolicy, may_dial, normalise_host, split_authority

CountAttempt = Callable[[bool], None]  # called once per connection a guest asks for: allowed or not


READ_CHUNK = 65536
LINGER = 1.0  # seconds, and reads of up to READ_CHUNK, spent discarding the guest's bytes after an error
LINGER_READS = 16
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
# Hop-by-hop (RFC 9110 7.6.1) or meant for this proxy; Host is rebuilt from the target URL.
_DROPPED = frozenset(
    ("connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate", "te", "trailer",
     "upgrade", "host")
)  # fmt: skip


@dataclass(frozen=True)
class EgressLimits:
    """Bounds on what one VM's guest can hold open or make the edge wait for."""

    max_head: int = 16384
    head_timeout: float = 10.0
    connect_timeout: float = 10.0
    idle_timeout: float = 300.0
    max_connections: int = 64


class _Refusal(Exception):
    """The request ends with an error response; `status` and a short text for the guest."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass(frozen=True)
class _Request:
    method: str
    host: str
    port: int
    origin_head: bytes  # for plain HTTP: the head to send the target; empty for CONNECT
    body_length: int | None  # bytes of body to forward; None: until either side closes


class EgressProxy:
    """The egress proxy of one VM, serving on a listening socket the caller made.

    `policy` may be replaced at any time; it applies to connections asked for afterwards.
    """

    def __init__(
        self, vm_id: str, policy: EgressPolicy, sock: socket.socket, count: CountAttempt,
        limits: EgressLimits | None = None,
    ) -> None:  # fmt: skip
        self.vm_id = vm_id
        self.policy = policy
        self.limits = limits or EgressLimits()
        self._sock = sock
        self._count = count
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy = 0  # connections past the cap check

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, sock=self._sock, limit=self.limits.max_head)

    async def stop(self) -> None:
        """Close the listener and every connection, tunnels included."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Each connection's work runs in a task of ours, so stop() can cancel it without asyncio's
        streams reporting the cancelled connection callback as an error."""
        if len(self._tasks) >= 2 * self.limits.max_connections:  # refusals linger too: bound them as well
            self._deny(None, None, "too many connections")
            writer.transport.abort()
            return
        handler = asyncio.create_task(self._handle(reader, writer))
        self._tasks.add(handler)
        handler.add_done_callback(self._tasks.discard)
        try:
            await asyncio.wait((handler,))
        finally:
            handler.cancel()
            writer.close()
        if not handler.cancelled():
            handler.result()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._busy >= self.limits.max_connections:
                self._deny(None, None, "too many connections")
                await _respond(reader, writer, 503, "too many connections through this VM's egress proxy")
                return
            self._busy += 1
            try:
                await self._exchange(reader, writer)
            finally:
                self._busy -= 1
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the guest or the target went away: nothing left to tell anyone

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            req = await self._read_request(reader)
        except _Refusal as refusal:
            self._deny(None, None, refusal.text)
            await _respond(reader, writer, refusal.status, refusal.text)
            return
        if not self.policy.allows(req.host, req.port):
            self._deny(req.host, req.port, "not in the VM's egress policy", req.method)
            await _respond(reader, writer, 403, f"egress to {req.host}:{req.port} is not allowed by this VM's policy")
            return
        try:
            up_reader, up_writer, address = await self._dial(req.host, req.port)
        except _Refusal as refusal:
            if refusal.status == 403:
                self._deny(req.host, req.port, refusal.text, req.method)
            else:
                self._allowed(req, status=refusal.status, error=refusal.text)
            await _respond(reader, writer, refusal.status, refusal.text)
            return
        self._allowed(req, address=address)
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = [0, 0]
        try:
            if req.origin_head:
                up_writer.write(req.origin_head)
            else:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await self._relay(reader, writer, up_reader, up_writer, req, sent)
        finally:
            up_writer.close()
            log.event(
                "egress.closed", vm=self.vm_id, host=req.host, port=req.port, up_bytes=sent[0], down_bytes=sent[1],
                seconds=round(loop.time() - started, 3),
            )  # fmt: skip

    async def _read_request(self, reader: asyncio.StreamReader) -> _Request:
        try:
            async with asyncio.timeout(self.limits.head_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _Refusal(431, f"request head larger than {self.limits.max_head} bytes") from None
        except TimeoutError:
            raise _Refusal(408, f"no complete request head within {self.limits.head_timeout:g} s") from None
        return _parse(head)

    async def _dial(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        """Connect from the edge's namespace to the first reachable address host has that may be dialled."""
        target = normalise_host(host)
        assert target is not None  # the policy allowed it, so it is a valid name or IP
        loop = asyncio.get_running_loop()
        error = "no address"
        try:
            async with asyncio.timeout(self.limits.connect_timeout):
                try:
                    infos = await loop.getaddrinfo(target, port, type=socket.SOCK_STREAM)
                except OSError as e:
                    raise _Refusal(502, f"cannot resolve {host}: {e.strerror or e}") from None
                addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
                dialable = [a for a in addresses if may_dial(target, a)]
                if addresses and not dialable:
                    raise _Refusal(403, f"{host} resolves to a non-public address, which egress never reaches")
                for address in dialable:
                    try:
                        up_reader, up_writer = await asyncio.open_connection(address, port, limit=READ_CHUNK)
                    except OSError as e:
                        error = e.strerror or str(e)
                        continue
                    return up_reader, up_writer, address
        except TimeoutError:
            error = f"timed out after {self.limits.connect_timeout:g} s"
        raise _Refusal(502, f"cannot connect to {host}:{port}: {error}")

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter, req: _Request, sent: list[int],
    ) -> None:  # fmt: skip
        """Copy bytes both ways until the target's side ends (for a tunnel, the guest's too) or all is idle.

        A plain request ends with the target's response: it was asked to close the connection.
        """
        loop = asyncio.get_running_loop()
        last = loop.time()

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, i: int, limit: int | None) -> None:
            nonlocal last
            while limit is None or sent[i] < limit:
                data = await src.read(READ_CHUNK if limit is None else min(READ_CHUNK, limit - sent[i]))
                if not data:
                    if limit is None and dst.can_write_eof():
                        dst.write_eof()
                    return
                dst.write(data)
                sent[i] += len(data)
                last = loop.time()
                await dst.drain()

        up = asyncio.create_task(pump(reader, up_writer, 0, req.body_length))
        down = asyncio.create_task(pump(up_reader, writer, 1, None))
        waiting = {down} if req.origin_head else {up, down}
        try:
            while waiting:
                done, _ = await asyncio.wait(
                    waiting, timeout=max(0.0, last + self.limits.idle_timeout - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
                for task in done:
                    task.result()
                waiting -= done
                if not done and loop.time() >= last + self.limits.idle_timeout:
                    log.event(
                        "egress.idle", vm=self.vm_id, host=req.host, port=req.port, seconds=self.limits.idle_timeout
                    )
                    return
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)

    def _allowed(self, req: _Request, **fields: Any) -> None:
        self._count(True)
        log.event("egress.allowed", vm=self.vm_id, host=req.host, port=req.port, method=req.method, **fields)

    def _deny(self, host: str | None, port: int | None, reason: str, method: str | None = None) -> None:
        self._count(False)
        log.event("egress.denied", vm=self.vm_id, host=host, port=port, method=method, reason=reason)


class EgressProxies:
    """Every VM's egress proxy, by VM id: what the VM manager calls as VMs start and go away."""

    def __init__(
        self, count: CountAttempt, limits: EgressLimits | None = None, host: str = netns.HOST_IP,
        port: int = netns.EGRESS_PORT,
    ) -> None:  # fmt: skip
        self._count = count  # e.g. the edge's metrics: each attempt, allowed or not
        self._limits = limits
        self._host, self._port = host, port
        self._proxies: dict[str, EgressProxy] = {}

    async def open(self, vm_id: str, policy: EgressPolicy) -> None:
        """(Re)start the VM's proxy in its namespace: after netns.create, before the guest runs."""
        await self.close(vm_id)
        sock = await netns.listen_in(vm_id, self._host, self._port)
        proxy = EgressProxy(vm_id, policy, sock, self._count, self._limits)
        try:
            await proxy.start()
        except BaseException:
            sock.close()
            raise
        self._proxies[vm_id] = proxy

    async def close(self, vm_id: str) -> None:
        """Stop the VM's proxy and its tunnels, if it has one; before its namespace goes."""
        proxy = self._proxies.pop(vm_id, None)
        if proxy is not None:
            await proxy.stop()

    async def close_all(self) -> None:
        for vm_id in list(self._proxies):
            await self.close(vm_id)


def _parse(head: bytes) -> _Request:
    """The request line and headers; for plain HTTP also the origin-form head to send the target."""
    lines = head[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise _Refusal(400, "malformed request line")
    method, target, _ = parts
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name) or "\r" in value or "\n" in value:
            raise _Refusal(400, "malformed header line")
        headers.append((name, value.strip(" \t")))
    if method == "CONNECT":
        try:
            host, port_text = split_authority(target)
        except ValueError:
            raise _Refusal(400, "CONNECT needs host:port") from None
        return _Request(method, host, _port(port_text), b"", None)
    return _plain_request(method, target, headers)


def _plain_request(method: str, target: str, headers: list[tuple[str, str]]) -> _Request:
    if not target.lower().startswith("http://"):
        raise _Refusal(400, "ask for an absolute http:// URL, or CONNECT host:port for anything else")
    url = urlsplit(target)
    if "@" in url.netloc or not url.hostname:
        raise _Refusal(400, "the URL needs a host and no user info")
    try:
        port = url.port or 80
    except ValueError:
        raise _Refusal(400, "bad port in the URL") from None
    named = {name.lower() for name, _ in headers}
    lengths = {value for name, value in headers if name.lower() == "content-length"}
    if "transfer-encoding" in named and lengths:
        raise _Refusal(400, "both Content-Length and Transfer-Encoding")
    if len(lengths) > 1 or not all(v.isdigit() for v in lengths):
        raise _Refusal(400, "bad Content-Length")
    body_length: int | None = None if "transfer-encoding" in named else int(lengths.pop()) if lengths else 0
    options = {
        option.strip().lower() for name, value in headers if name.lower() == "connection" for option in value.split(",")
    }
    kept = [f"{name}: {value}\r\n" for name, value in headers if name.lower() not in _DROPPED | options]
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    origin = f"{method} {path} HTTP/1.1\r\nHost: {url.netloc}\r\n{''.join(kept)}Connection: close\r\n\r\n"
    return _Request(method, url.hostname, port, origin.encode("latin-1"), body_length)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise _Refusal(400, f"bad port {text!r}")
    return int(text)


async def _respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, text: str) -> None:
    """An error response, then a short lingering close: closing with the guest's bytes unread would
    reset the connection, and the guest could lose the response."""
    body = (text + "\n").encode()
    writer.write(
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    writer.write_eof()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER):
            for _ in range(LINGER_READS):
                if not await reader.read(READ_CHUNK):
                    break
