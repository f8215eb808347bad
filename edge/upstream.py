"""Connections to guests (and the control socket), and the keep-alive pool that reuses them.

An UpstreamConn belongs to at most one client exchange at a time (its `owner`) and sits in
the pool between exchanges. It tracks response boundaries with llhttp so a connection
goes back to the pool only after a complete response, and then at once: a client idling
between requests holds no guest connection, so guest connections stay within the pool's
bound plus the requests in flight of the last `SURPLUS_GRACE` seconds.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, cast

from httptools import HttpResponseParser
from httptools.parser.errors import HttpParserUpgrade

from .backend import VmBackend

CONTROL_KEY = ""  # pool key of control-socket connections; never a VM id
_TCP_ESTABLISHED = 1  # tcpi_state, the first byte of struct tcp_info
# The largest message kept to be recognised when its bytes come again (a request read, an answer):
# a polled URL's are small, and each connection holds at most one.
REPEAT_MAX = 4096
# How long idle connections past a VM's bound are kept. Under load every connection comes back
# and is taken again within one loop iteration or two; closed at once, each of the connections
# past the bound was reopened for the next request (a new guest connection for every other
# request at 64 clients with the default bound of 32).
SURPLUS_GRACE = 1.0


@dataclass(frozen=True, slots=True)
class KeptAnswer:
    """A whole small kept-alive answer read in one piece, as an HTTP/2 stream translated it: the same
    bytes again on the connection are the same answer again (no parser state outlives an answer)."""

    data: bytes
    status: int
    headers: tuple[tuple[bytes, bytes], ...]  # hop-by-hop ones left out; the edge's Set-Cookie is per exchange
    body: bytes


class Owner(Protocol):
    """What an UpstreamConn reports to the exchange using it."""

    def upstream_data(self, data: bytes) -> None: ...
    def upstream_lost(self, conn: UpstreamConn) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    def upstream_resume_writing(self) -> None: ...


class ResponseTracker:
    """Follows one connection's responses without looking at bodies.

    `final` is set on the first non-1xx head (or 101), `done` when that response ends.
    A message starting after `done` means the upstream sent more than it was asked for.
    """

    __slots__ = ("done", "extra", "final", "keep_alive", "parser", "repeat", "repeat_status", "status")

    def __init__(self) -> None:
        self.parser = HttpResponseParser(self)
        # The last answer when it came whole in one read, kept while it is small: the same bytes
        # again are the same answer again (`again`), with llhttp in the same state after it.
        self.repeat: bytes | None = None
        self.repeat_status = 0
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.final = False
        self.done = False
        self.keep_alive = False
        self.extra = False

    def feed(self, data: bytes) -> bool:
        """Follow response bytes; True when they switch protocols (what follows is not HTTP).

        Raises HttpParserError when the upstream's bytes are not a valid response.
        """
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            return True
        return False

    def keep(self, data: bytes) -> None:
        """`data`, fed from an answer's start, was all of one kept-alive answer: kept when small."""
        if len(data) <= REPEAT_MAX and self.keep_alive and not self.extra:
            self.repeat, self.repeat_status = data, self.status

    def again(self) -> None:
        """The kept answer came again, byte for byte: done as llhttp would find it, unparsed."""
        self.status = self.repeat_status
        self.final = self.done = self.keep_alive = True

    def head_ends_it(self, more: bool) -> None:
        """The final head was all of the response (a HEAD answer, whatever its Content-Length
        says); `more`: bytes came after it, so the connection is out of step."""
        if not self.done:
            self.done = True
            self.keep_alive = self.parser.should_keep_alive()
        self.extra = self.extra or more

    def on_message_begin(self) -> None:
        if self.done:
            self.extra = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if (status >= 200 or status == 101) and not self.final:
            self.status = status
            self.final = True

    def on_message_complete(self) -> None:
        if self.final and not self.done:
            self.done = True
            self.keep_alive = self.parser.should_keep_alive()


def take_head(buf: bytearray) -> bytes | None:
    """Remove and return the first whole response head in `buf`; None while it is incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[: end + 4])
    del buf[: end + 4]
    return head


class UpstreamConn(asyncio.Protocol):
    """One connection to a guest port; `owner` is None while it is pooled."""

    __slots__ = (
        "answer",
        "closed",
        "generation",
        "idle_since",
        "key",
        "owner",
        "pool",
        "probe",
        "reading",
        "send",
        "send_parts",
        "stale",
        "tracker",
        "transport",
        "write_paused",
    )

    transport: asyncio.Transport  # set by connection_made, before anyone gets the connection
    send: Callable[[bytes], object]  # the transport's write and writelines, once connected
    send_parts: Callable[[Iterable[bytes]], object]

    def __init__(self, pool: UpstreamPool, key: tuple[str, int], generation: int = 0) -> None:
        self.pool = pool
        self.key = key
        self.generation = generation  # the VM's generation it was opened in; never reused in another
        # TCP only: a socket object on the transport's descriptor, made once, to ask the kernel
        # whether it is still established (the transport's own builds a new object per call,
        # which costs a getsockname as well); detached, never closed, when the connection ends.
        self.probe: socket.socket | None = None
        self.owner: Owner | None = None
        self.tracker = ResponseTracker()
        self.answer: KeptAnswer | None = None  # the last one an HTTP/2 stream parsed, when kept
        self.closed = False
        self.stale = False  # its VM stopped running while it was in use: close, never pool
        self.reading = True
        self.write_paused = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.send = self.transport.write
        self.send_parts = self.transport.writelines
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            self.probe = socket.socket(sock.family, sock.type, sock.proto, sock.fileno())
        self.pool.track(self)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is not None:
            owner.upstream_data(data)
        else:  # bytes nobody asked for: the connection is out of step, never reuse it
            self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._let_go_of_probe()
        self.pool.discard(self)
        owner = self.owner
        if owner is not None:
            self.owner = None
            owner.upstream_lost(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.owner is not None:
            self.owner.upstream_pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.owner is not None:
            self.owner.upstream_resume_writing()

    def pause_reading(self) -> None:
        if self.reading and not self.closed:
            self.reading = False
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.reading and not self.closed:
            self.reading = True
            self.transport.resume_reading()

    def established(self) -> bool:
        """Still open both ways as far as the kernel knows. A pooled connection is asked before
        it carries a request: one whose guest went away (destroyed when its VM was suspended,
        or closed by the guest) may not have been reported to this process yet, and a request
        written on it could not be told apart from one the guest received."""
        if self.closed or self.transport.is_closing():
            return False
        probe = self.probe
        if probe is None:
            return True
        try:
            info = probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
        except OSError:
            return False
        return info[0] == _TCP_ESTABLISHED

    def finish(self, now: float, reusable: bool) -> None:
        """Its exchange is over: back to the shared pool at once when the response ended
        cleanly and the connection is in step (`reusable`), else closed."""
        tr = self.tracker
        if reusable and tr.done and tr.keep_alive and not tr.extra:
            self.pool.release(self, now)
        else:
            self.close()

    def close(self) -> None:
        """Close for good; the owner, if any, must have let go first."""
        self.owner = None
        if not self.closed:
            self.closed = True
            self._let_go_of_probe()
            self.transport.close()
        self.pool.discard(self)

    def _let_go_of_probe(self) -> None:
        """The descriptor is the transport's: detached, so that freeing the probe never closes
        it (by then its number may belong to another connection)."""
        probe = self.probe
        if probe is not None:
            self.probe = None
            probe.detach()


class UpstreamPool:
    """Idle keep-alive connections per VM and port: newest first, bounded, expiring.

    At most `per_vm` idle connections per VM (all its ports together) once `surplus_grace`
    has passed: the ones past the bound that nobody took again within it are closed, oldest
    first, so a VM's connections follow the requests it had in flight a moment ago and
    never churn under steady load. Connections idle longer than `idle_timeout` are closed
    by a periodic sweep and skipped by `acquire`. `per_vm` 0 pools nothing.
    """

    def __init__(self, per_vm: int, idle_timeout: float, surplus_grace: float = SURPLUS_GRACE) -> None:
        self.per_vm = per_vm
        self.idle_timeout = idle_timeout
        self.surplus_grace = min(surplus_grace, idle_timeout)
        self._idle: dict[str, dict[int, list[UpstreamConn]]] = {}
        self._counts: dict[str, int] = {}
        self._live: dict[str, set[UpstreamConn]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._trimmer: asyncio.TimerHandle | None = None

    def acquire(self, vm_id: str, port: int, now: float, generation: int) -> UpstreamConn | None:
        """A live idle connection to (vm_id, port) opened in the VM's `generation`, or None."""
        ports = self._idle.get(vm_id)
        if ports is None:
            return None
        stack = ports.get(port)
        while stack:
            conn = stack.pop()
            self._forget(vm_id, port, ports, stack)
            if now - conn.idle_since >= self.idle_timeout or conn.generation != generation or not conn.established():
                conn.close()
                continue
            return conn
        return None

    def release(self, conn: UpstreamConn, now: float) -> None:
        """Take back a connection after a complete response; past the bound it stays for
        `surplus_grace` only (closed at once when that is 0)."""
        conn.owner = None
        vm_id, port = conn.key
        count = self._counts.get(vm_id, 0)
        past_bound = count >= self.per_vm
        if conn.closed or conn.stale or not self.per_vm or (past_bound and not self.surplus_grace):
            conn.close()
            return
        conn.idle_since = now
        if not conn.reading:
            conn.resume_reading()  # an idle connection must notice the peer closing it
        self._idle.setdefault(vm_id, {}).setdefault(port, []).append(conn)
        self._counts[vm_id] = count + 1
        if self._sweeper is None:
            self._schedule_sweep()
        if past_bound and self._trimmer is None:
            self._trimmer = asyncio.get_running_loop().call_later(self.surplus_grace, self._trim_surplus)

    def track(self, conn: UpstreamConn) -> None:
        """Know every open connection of a VM, in use or idle, for drop_vm."""
        self._live.setdefault(conn.key[0], set()).add(conn)

    def discard(self, conn: UpstreamConn) -> None:
        """Forget a connection that closed."""
        vm_id, port = conn.key
        live = self._live.get(vm_id)
        if live is not None:
            live.discard(conn)
            if not live:
                del self._live[vm_id]
        ports = self._idle.get(vm_id)
        stack = ports.get(port) if ports is not None else None
        if stack is not None and ports is not None and conn in stack:
            stack.remove(conn)
            self._forget(vm_id, port, ports, stack)

    def drop_vm(self, vm_id: str) -> int:
        """Close every idle connection of a VM (it was paused, suspended or deleted); those
        in use are closed when their exchange ends instead of coming back."""
        for conn in self._live.get(vm_id, ()):
            conn.stale = True
        ports = self._idle.pop(vm_id, None)
        self._counts.pop(vm_id, None)
        closed = 0
        for stack in (ports or {}).values():
            for conn in stack:
                conn.close()
                closed += 1
        return closed

    def abort_vm(self, vm_id: str) -> None:
        """The VM is going away (suspended, failed, deleted): end its connections in use too.

        Its guest will never send a FIN, so a request or WebSocket on them would hang; aborted,
        their owners answer 502 or close the client connection.
        """
        self.drop_vm(vm_id)
        for conn in list(self._live.get(vm_id, ())):
            conn.transport.abort()

    def idle_count(self, vm_id: str) -> int:
        return self._counts.get(vm_id, 0)

    def live_count(self, vm_id: str) -> int:
        """Open connections to a VM, idle and in use."""
        return len(self._live.get(vm_id, ()))

    def close(self) -> None:
        """Close everything idle and stop sweeping (server shutdown)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._trimmer is not None:
            self._trimmer.cancel()
            self._trimmer = None
        for vm_id in list(self._idle):
            self.drop_vm(vm_id)

    def _forget(self, vm_id: str, port: int, ports: dict[int, list[UpstreamConn]], stack: list[UpstreamConn]) -> None:
        """Bookkeeping after one connection left a stack."""
        left = self._counts[vm_id] - 1
        if left:
            self._counts[vm_id] = left
        else:
            del self._counts[vm_id]
        if not stack:
            del ports[port]
            if not ports:
                del self._idle[vm_id]

    def _trim_surplus(self) -> None:
        """Close connections past a VM's bound that stayed idle for the grace, oldest first."""
        self._trimmer = None
        deadline = asyncio.get_running_loop().time() - self.surplus_grace
        over = False
        for vm_id, ports in list(self._idle.items()):
            for stack in list(ports.values()):
                while stack and self._counts.get(vm_id, 0) > self.per_vm and stack[0].idle_since <= deadline:
                    stack[0].close()
            over = over or self._counts.get(vm_id, 0) > self.per_vm
        if over:  # the rest past the bound was in use a moment ago: look again after a grace
            self._trimmer = asyncio.get_running_loop().call_later(self.surplus_grace, self._trim_surplus)

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(max(self.idle_timeout / 2, 0.05), self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweeper = None
        deadline = loop.time() - self.idle_timeout
        for ports in list(self._idle.values()):
            for stack in list(ports.values()):
                # Oldest at the bottom: expire from there until a fresh one.
                while stack and stack[0].idle_since <= deadline:
                    stack[0].close()
        if self._idle:
            self._schedule_sweep()


async def connect_vm(pool: UpstreamPool, backend: VmBackend, vm_id: str, port: int, timeout: float) -> UpstreamConn:
    """A new connection to a guest port, opened inside the VM's network namespace, in the
    VM's generation as known once it is connected."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        sock = await backend.open_upstream(vm_id, port, timeout)
    rec = backend.lookup(vm_id)
    return await _wrap(loop, sock, pool, (vm_id, port), rec.generation if rec is not None else -1)


async def connect_unix(pool: UpstreamPool, path: str, timeout: float) -> UpstreamConn:
    """A new connection to the control API's unix socket."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, conn = await loop.create_unix_connection(lambda: UpstreamConn(pool, (CONTROL_KEY, 0)), path)
    return conn


async def _wrap(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, pool: UpstreamPool, key: tuple[str, int], generation: int
) -> UpstreamConn:
    try:
        _, conn = await loop.create_connection(lambda: UpstreamConn(pool, key, generation), sock=sock)
    except BaseException:
        sock.close()  # no-op when the loop already took the descriptor and closed it
        raise
    return conn
