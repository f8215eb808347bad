"""The client side of the edge: one asyncio Protocol per client connection.

Request heads are parsed with llhttp (httptools) to route by Host, check the VM's token
and rewrite the head; bodies and responses then move as bytes, never as request objects.
Requests on one connection are answered one at a time and in order: pipelined ones are
parsed ahead and wait (reading paused), so buffering stays within one read.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import cast

from httptools import HttpRequestParser
from httptools.parser.errors import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from vmm.errors import VmmError
from vmm.jsonlog import log
from vmm.model import VmState

from .admission import Admitter, Refusal
from .errors_http import error_response
from .proxy_context import ProxyContext
from .reqhead import RequestHead
from .upstream import CONTROL_KEY, ResponseTracker, UpstreamConn, connect_unix, connect_vm, take_head

# Why reading from the client is paused; it resumes when no reason is left.
_WAITING = 1  # the request waiting for a wake or a connection has buffered enough body
_QUEUED = 2  # later requests are parsed and wait their turn (or bytes after an Upgrade)
_UPSTREAM = 4  # the upstream's write buffer is full

# A request that failed on a reused connection before any answer is sent again on a new
# one when repeating it is harmless (the keep-alive race with the guest closing first).
_RETRYABLE = frozenset((b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"PUT", b"TRACE"))
_LAST_CHUNK = b"0\r\n\r\n"
# Body bytes kept for a request waiting for its upstream. Reading goes on until then so a
# client that leaves is noticed (and its place among the held requests freed).
_HOLD_BUFFER = 256 * 1024
_TOUCH_EVERY = 1.0  # long streams report activity (and bytes) at most this often
_CLOSE_GRACE = 30.0  # a closing connection whose peer stops reading is aborted after this
_PAUSED_RECHECK = 1.0  # a body paused by the edge: its deadlines are looked at again this often
_INF = float("inf")


class _Exchange:
    """One request and its answer."""

    __slots__ = (
        "body",
        "buffered",
        "chunked",
        "control",
        "cookie",
        "counted",
        "discard",
        "has_body",
        "head",
        "is_head",
        "keep_alive",
        "method",
        "port",
        "received",
        "refusal",
        "req_done",
        "resp_done",
        "retried",
        "reused",
        "running",
        "sent",
        "status",
        "upgrade",
        "vm_id",
    )

    def __init__(self, method: bytes, keep_alive: bool, has_body: bool, chunked: bool, upgrade: bool) -> None:
        self.method = method
        self.is_head = method == b"HEAD"
        # An Upgrade the VM refuses leaves the connection's framing unknown: close after it.
        self.keep_alive = keep_alive and not upgrade
        self.has_body = has_body
        self.chunked = chunked
        self.upgrade = upgrade
        self.vm_id: str | None = None
        self.port = 0
        self.control = False
        self.running = True
        self.head = b""
        self.cookie: bytes | None = None  # a Set-Cookie line for the response head
        self.refusal: Refusal | None = None  # the edge answers itself
        self.body: list[bytes] | None = []  # body bytes read before an upstream is attached
        self.buffered = 0
        self.received = 0  # request body bytes so far, for body_min_rate
        self.discard = False  # the body is not wanted (answered already)
        self.req_done = False
        self.resp_done = False
        self.sent = False  # bytes of the answer went to the client
        self.status = 0
        self.reused = False
        self.retried = False
        self.counted = False  # included in ctx.open_streams


class EdgeProtocol(asyncio.Protocol):
    """Routes, authorises and splices the requests of one client connection."""

    transport: asyncio.Transport

    def __init__(self, ctx: ProxyContext, forwarded_proto: bytes) -> None:
        self._ctx = ctx
        self._s = ctx.settings
        self._proto = forwarded_proto
        self._loop = asyncio.get_running_loop()
        self._parser = HttpRequestParser(self)
        self._client = b"unknown"
        self._req = RequestHead()
        self._url = b""
        self._in_head = False
        self._msgs = 0
        self._head_bytes = 0  # url and headers delivered so far
        self._head_raw = 0  # reads that fell wholly inside the head
        self._headers = 0  # header fields of the head being parsed
        self._counted_ip = False  # included in ctx.per_ip
        self._admitter: Admitter
        self._ex: _Exchange | None = None  # the request being answered
        self._parsing: _Exchange | None = None  # the request whose body is being read
        self._queue: deque[_Exchange] = deque()
        # The upstream of the request being answered; between requests a client holds none, so
        # idle keep-alive clients cost no guest connections past the pool's bound.
        self._up: UpstreamConn | None = None
        self._rbuf: bytearray | None = None  # a response head being collected (HEAD, Set-Cookie)
        self._stash: bytearray | None = None  # client bytes after an Upgrade request
        self._tunnel = False
        self._paused = 0
        self._write_paused = False
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _INF
        self._idle_deadline = _INF
        self._head_deadline = _INF
        self._closing = False
        self._lingering = False
        self._closed = False
        self._dead = False  # the request stream is unparseable: answer what is queued, then close
        self._draining = False  # the edge is stopping: close once the requests received are answered
        self._up_bytes = 0
        self._down_bytes = 0
        self._touch_at = 0.0
        self._body_at = 0.0  # last time request body bytes arrived (or the edge let the client send again)
        self._body_start = 0.0  # when the body being read started
        self._body_paused = 0.0  # _paused_for() when it started: time the edge paused reading is not the client's
        self._paused_at = 0.0
        self._paused_total = 0.0
        self._flush_at = 0.0

    # -- client transport ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._client = str(peer[0]).encode("ascii", "replace")
        ctx = self._ctx
        self._admitter = Admitter(
            ctx.backend, ctx.router, ctx.tokens, self._client, self._proto, ctx.control_auth,
            trusted=ctx.settings.trusts(self._client),
        )  # fmt: skip
        now = self._loop.time()
        self._flush_at = now + _TOUCH_EVERY
        ctx.connection_made(self)
        if self._closing:  # drained as it arrived
            return
        if not ctx.client_opened(self._client):
            self._too_many_connections()
            return
        self._counted_ip = True
        self._idle_deadline = now + self._s.idle_timeout
        self._arm(self._idle_deadline)

    def data_received(self, data: bytes) -> None:
        if self._tunnel:
            up = self._up
            if up is not None:
                up.transport.write(data)
                self._up_bytes += len(data)
                self._flowing(self._loop.time())
            return
        if self._closing or self._dead:
            return
        if self._stash is not None:
            self._stash += data
            if len(self._stash) > self._s.max_head_size:
                self._pause(_QUEUED)
            return
        in_head, msgs = self._in_head, self._msgs
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as exc:
            if self._parsing is not None:  # CONNECT ends at its head
                self.on_message_complete()
            self._stash = bytearray(data[exc.args[0] :])
        except HttpParserCallbackError as exc:
            log.event("proxy.error", level="error", error=repr(exc.__context__ or exc))
            self._malformed(500, "the edge failed to handle this request")
        except HttpParserError as exc:
            self._malformed(400, f"malformed request: {exc}")
        else:
            if self._in_head:
                if in_head and msgs == self._msgs:  # all of this read is head (one header may sit in llhttp)
                    self._head_raw += len(data)
                if max(self._head_raw, self._head_bytes) > self._s.max_head_size:
                    self._malformed(431, "the request head is too large")
                elif self._headers > self._s.max_headers:
                    self._malformed(431, f"the request head has more than {self._s.max_headers} header fields")

    def eof_received(self) -> bool:
        # Like nginx, a client's FIN is taken as leaving (browsers never half-close): held
        # and in-flight requests are dropped and their upstreams closed by connection_lost.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = self._closing = True
        self._teardown()
        if self._counted_ip:
            self._counted_ip = False
            self._ctx.client_closed(self._client)
        self._ctx.connection_lost(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._up is not None:
            self._up.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._up is not None:
            self._up.resume_reading()

    def drain(self) -> None:
        """The edge is stopping: close now when between requests, else once they are answered."""
        self._draining = True
        if self._ex is None and not self._queue and not self._in_head and not self._closing:
            self._close_client()

    def abort(self) -> None:
        self.transport.abort()

    # -- request parser callbacks ----------------------------------------------------

    def on_message_begin(self) -> None:
        self._req = RequestHead()
        self._url = b""
        self._in_head = True
        self._msgs += 1
        self._head_bytes = self._head_raw = self._headers = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._req.add(name, value)
        self._head_bytes += len(name) + len(value) + 4
        self._headers += 1

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._closing:
            return
        p = self._parser
        req = self._req
        ex = _Exchange(p.get_method(), p.should_keep_alive(), req.has_body, req.chunked, p.should_upgrade())
        self._parsing = ex
        if self._head_bytes > self._s.max_head_size:
            self._dead = True
            ex.keep_alive = False
            self._refuse(ex, Refusal(431, "the request head is too large"))
        elif self._headers > self._s.max_headers:
            self._dead = True
            ex.keep_alive = False
            self._refuse(ex, Refusal(431, f"the request head has more than {self._s.max_headers} header fields"))
        else:
            try:
                verdict = self._admitter.admit(ex.method, self._url, p.get_http_version(), req, ex.upgrade)
            except Exception as exc:  # a bug in admission must still answer, never leave the client hanging
                log.event("edge.admission_error", level="error", error=repr(exc))
                ex.keep_alive = False
                verdict = Refusal(400, "the request could not be admitted")
            if isinstance(verdict, Refusal):
                self._refuse(ex, verdict)
            else:
                ex.head = verdict.head
                ex.vm_id = verdict.vm_id
                ex.control = verdict.vm_id is None
                ex.port = verdict.port
                ex.running = verdict.running
                ex.cookie = verdict.set_cookie
        if self._ex is None and not self._queue:
            self._activate(ex)
        else:
            self._queue.append(ex)
            self._pause(_QUEUED)

    def on_body(self, body: bytes) -> None:
        ex = self._parsing
        if ex is None or ex.discard:
            return
        now = self._loop.time()
        self._body_at = now
        ex.received += len(body)
        self._up_bytes += len(body)
        if ex.chunked:
            parts: tuple[bytes, ...] = (b"%x\r\n" % len(body), body, b"\r\n")
            if ex.body is not None:
                ex.body += parts
            elif self._up is not None:
                self._up.transport.writelines(parts)
        elif ex.body is not None:
            ex.body.append(body)
        elif self._up is not None:
            self._up.transport.write(body)
        if ex.body is not None:
            ex.buffered += len(body)
            if ex.buffered > _HOLD_BUFFER:
                self._pause(_WAITING)
        self._flowing(now)

    def on_message_complete(self) -> None:
        ex = self._parsing
        if ex is None:
            return
        self._parsing = None
        ex.req_done = True
        if not ex.discard:
            if ex.chunked:
                if ex.body is not None:
                    ex.body.append(_LAST_CHUNK)
                elif self._up is not None:
                    self._up.transport.write(_LAST_CHUNK)
            if ex is self._ex and self._up is not None:
                self._await_head()
        if ex.resp_done:
            self._next(ex)

    # -- deciding on a request -----------------------------------------------------------

    def _refuse(self, ex: _Exchange, refusal: Refusal) -> None:
        ex.refusal = refusal
        ex.discard = True
        ex.body = None

    def _malformed(self, status: int, message: str) -> None:
        """The request stream cannot be parsed further: answer in turn, then close."""
        self._dead = True
        ex = self._parsing
        self._parsing = None
        if ex is None:
            ex = _Exchange(b"", False, False, False, False)
            self._refuse(ex, Refusal(status, message))
            ex.req_done = True
            if self._ex is None and not self._queue:
                self._activate(ex)
            else:
                self._queue.append(ex)
            return
        ex.keep_alive = False
        ex.req_done = True
        if ex is not self._ex:  # still queued: it gets the error instead
            self._refuse(ex, Refusal(status, message))
        elif ex.sent or ex.resp_done:
            self._close_client()
        else:
            self._answer(ex, status, message)

    # -- answering ---------------------------------------------------------------------

    def _activate(self, ex: _Exchange) -> None:
        self._ex = ex
        refusal = ex.refusal
        if refusal is not None:
            self._answer(ex, refusal.status, refusal.message, reason=refusal.reason, bearer=refusal.bearer)
            return
        ctx = self._ctx
        now = self._loop.time()
        vm_id = ex.vm_id
        if vm_id is not None:
            ctx.backend.touch(vm_id)
            ctx.stream_opened(vm_id)
            ex.counted = True
            self._touch_at = now + _TOUCH_EVERY
        if ex.has_body and not ex.req_done:
            self._body_at = self._body_start = now
            self._body_paused = self._paused_for(now)
            self._arm(self._body_check(ex, now)[1])
        if ex.running:
            key = vm_id or CONTROL_KEY
            conn = ctx.pool.acquire(key, ex.port, now)
            if conn is not None:
                self._attach(ex, conn, reused=True)
                return
        self._start_task(ex)

    def _start_task(self, ex: _Exchange) -> None:
        self._task = self._loop.create_task(self._prepare(ex))

    async def _prepare(self, ex: _Exchange) -> None:
        """Wake the VM if needed and open a connection to it; body bytes meanwhile are buffered."""
        try:
            if not self._vm_running(ex) and not await self._hold(ex):
                return
            conn = await self._open(ex)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            self._upstream_error(ex, 504, f"no connection to {self._where(ex)} within {self._s.connect_timeout:g}s")
            return
        except VmmError as exc:
            self._upstream_error(ex, exc.http_status, str(exc))
            return
        except OSError as exc:
            self._upstream_error(ex, 502, f"cannot connect to {self._where(ex)}: {exc.strerror or exc}")
            return
        except Exception as exc:
            log.event("proxy.error", level="error", vm=ex.vm_id, error=repr(exc))
            self._answer(ex, 500, "the edge failed to handle this request")
            return
        finally:
            if self._task is asyncio.current_task():
                self._task = None
        if self._ex is not ex or self._closing:
            conn.close()
            return
        self._attach(ex, conn, reused=False)

    def _vm_running(self, ex: _Exchange) -> bool:
        """Asked again when connecting: a queued or retried request may find its VM asleep by now."""
        if ex.vm_id is None:
            return True
        rec = self._ctx.backend.lookup(ex.vm_id)
        return rec is not None and rec.state is VmState.RUNNING

    async def _hold(self, ex: _Exchange) -> bool:
        """Wait for the VM to wake, within the per-VM bound; False when answered instead."""
        ctx, s = self._ctx, self._s
        vm_id = ex.vm_id
        assert vm_id is not None
        if ctx.wakes_refused:
            self._answer(ex, 503, f"the edge is shutting down: VM {vm_id} is not woken now", retry_after=s.retry_after)
            return False
        held = ctx.held.get(vm_id, 0)
        if held >= s.max_held_per_vm:
            message = f"too many requests are waiting for VM {vm_id} to wake"
            self._answer(ex, 503, message, retry_after=s.retry_after)
            return False
        ctx.held[vm_id] = held + 1
        ctx.metrics.held(1)
        try:
            await asyncio.wait_for(asyncio.shield(ctx.wake(vm_id)), s.wake_timeout)
        except TimeoutError:
            message = f"VM {vm_id} did not wake within {s.wake_timeout:g}s"
            log.event("proxy.wake_timeout", level="warning", vm=vm_id)
            self._answer(ex, 503, message, retry_after=s.retry_after)
            return False
        except VmmError as exc:
            log.event("proxy.wake_failed", level="warning", vm=vm_id, error=str(exc))
            retry = s.retry_after if exc.http_status == 503 else None
            self._answer(ex, exc.http_status, str(exc), retry_after=retry)
            return False
        finally:
            left = ctx.held[vm_id] - 1
            if left:
                ctx.held[vm_id] = left
            else:
                del ctx.held[vm_id]
            ctx.metrics.held(-1)
        return True

    async def _open(self, ex: _Exchange) -> UpstreamConn:
        ctx = self._ctx
        timeout = self._s.connect_timeout
        if ex.control:
            return await connect_unix(ctx.pool, ctx.control_socket, timeout)
        assert ex.vm_id is not None
        return await connect_vm(ctx.pool, ctx.backend, ex.vm_id, ex.port, timeout)

    def _attach(self, ex: _Exchange, conn: UpstreamConn, reused: bool) -> None:
        """Send the request head (and any body read so far) on `conn`; relay from now on."""
        self._up = conn
        conn.owner = self
        conn.tracker.reset()
        ex.reused = reused
        if self._write_paused:
            conn.pause_reading()
        if conn.write_paused:
            self._pause(_UPSTREAM)
        self._rbuf = bytearray() if ex.is_head or ex.cookie is not None else None
        self._head_deadline = _INF
        body = ex.body
        ex.body = None
        if body:
            conn.transport.writelines([ex.head, *body])
            self._up_bytes += sum(map(len, body))
        else:
            conn.transport.write(ex.head)
        self._up_bytes += len(ex.head)
        if ex.req_done:
            self._await_head()
        self._unpause(_WAITING)

    def _await_head(self) -> None:
        self._head_deadline = self._loop.time() + self._s.read_timeout
        self._arm(self._head_deadline)

    def _answer(
        self,
        ex: _Exchange,
        status: int,
        message: str,
        *,
        reason: str | None = None,
        bearer: bool = False,
        retry_after: int | None = None,
    ) -> None:
        """Answer `ex` with the edge's own JSON error (nothing of the VM's answer was sent)."""
        task = self._task
        if task is not None and task is not asyncio.current_task():
            self._task = None
            task.cancel()
        self._drop_upstream()
        self._unpause(_WAITING)
        close = not ex.keep_alive or self._dead or self._draining or (ex.has_body and not ex.req_done)
        data = error_response(
            status, message, reason=reason, close=close, retry_after=retry_after, bearer=bearer, body=not ex.is_head
        )
        self.transport.write(data)
        self._down_bytes += len(data)
        ex.sent = True
        ex.status = status
        ex.discard = True
        ex.body = None
        if close:
            ex.keep_alive = False
        self._ctx.metrics.request(status)
        self._response_finished(ex)

    def _upstream_error(self, ex: _Exchange, status: int, message: str) -> None:
        log.event("proxy.error", level="warning", vm=ex.vm_id, port=ex.port, status=status, error=message)
        if ex.sent:
            self._close_client()
        else:
            retry = self._s.retry_after if status == 503 else None
            self._answer(ex, status, message, retry_after=retry)

    def _where(self, ex: _Exchange) -> str:
        return "the control API" if ex.control else f"port {ex.port} of VM {ex.vm_id}"

    def _response_finished(self, ex: _Exchange) -> None:
        ex.resp_done = True
        if ex.req_done:
            self._next(ex)
        elif ex.has_body:  # the rest of the body is not wanted: read it off briefly, then close
            ex.discard = True
            self._close_client(linger=True)
        # else: the request's end is in the bytes being parsed; on_message_complete moves on

    def _next(self, ex: _Exchange) -> None:
        """The exchange is over: go on with the next request, or close."""
        if ex.counted:
            ex.counted = False
            assert ex.vm_id is not None
            self._ctx.stream_closed(ex.vm_id)
        self._ex = None
        if not ex.keep_alive or (self._draining and not self._queue):
            self._close_client(linger=self._dead)  # after a parse error the client may still be sending
            return
        if self._queue:
            self._loop.call_soon(self._advance)  # not recursively: a read can hold many requests
            return
        self._unpause(_QUEUED)
        now = self._loop.time()
        if now >= self._flush_at:
            self._flush_bytes(now)
        self._idle_deadline = now + self._s.idle_timeout
        self._arm(self._idle_deadline)

    def _advance(self) -> None:
        if self._closing or self._ex is not None or not self._queue:
            return
        ex = self._queue.popleft()
        if not self._queue:
            self._unpause(_QUEUED)
        self._activate(ex)

    # -- the upstream side (called by UpstreamConn) ----------------------------------------

    def upstream_data(self, data: bytes) -> None:
        self._down_bytes += len(data)
        if self._tunnel:
            self.transport.write(data)
            self._flowing(self._loop.time())
        elif self._rbuf is not None:
            self._collect_head(data)
        else:
            self._relay(data)

    def upstream_lost(self, conn: UpstreamConn) -> None:
        if conn is not self._up:
            return
        self._up = None
        self._unpause(_UPSTREAM)
        ex = self._ex
        if ex is None:
            return
        if self._tunnel:
            self._close_client()
        elif not ex.sent:
            if ex.reused and not ex.retried and not ex.has_body and ex.method in _RETRYABLE:
                ex.retried = True
                ex.body = []
                self._rbuf = None
                self._start_task(ex)
            else:
                self._upstream_error(ex, 502, f"{self._where(ex)} closed the connection without answering")
        else:  # the client learns where the answer ends from the connection closing
            ex.keep_alive = False
            self._close_client()

    def upstream_pause_writing(self) -> None:
        self._pause(_UPSTREAM)

    def upstream_resume_writing(self) -> None:
        self._unpause(_UPSTREAM)

    def _relay(self, data: bytes) -> None:
        """Forward response bytes as they are; the tracker finds where the response ends."""
        ex = self._ex
        conn = self._up
        assert ex is not None and conn is not None
        tr = conn.tracker
        try:
            upgraded = tr.feed(data)
        except HttpParserError as exc:
            self._bad_response(ex, str(exc))
            return
        self._send(ex, tr, data)
        if upgraded:
            self._upgraded(ex, tr)
        elif tr.done:
            self._response_done(ex, conn)
        else:
            self._flowing(self._loop.time())

    def _collect_head(self, data: bytes) -> None:
        """Hold response bytes until the final head is whole, to add Set-Cookie or end a HEAD."""
        ex = self._ex
        conn = self._up
        buf = self._rbuf
        assert ex is not None and conn is not None and buf is not None
        buf += data
        tr = conn.tracker
        while True:
            head = take_head(buf)
            if head is None:
                if len(buf) > self._s.max_head_size:
                    self._bad_response(ex, "the response head is too large")
                return
            try:
                upgraded = tr.feed(head)
            except HttpParserError as exc:
                self._bad_response(ex, str(exc))
                return
            if tr.final:
                break
            self._send(ex, tr, head)  # an interim 1xx, e.g. 100 Continue: pass it on now
        self._rbuf = None
        rest = bytes(buf)
        if ex.cookie is not None:
            eol = head.index(b"\r\n") + 2
            head = head[:eol] + ex.cookie + head[eol:]
        self._send(ex, tr, head)
        if upgraded:
            self._upgraded(ex, tr)
            if rest and self._tunnel:
                self.transport.write(rest)
        elif ex.is_head or tr.done:
            tr.head_ends_it(bool(rest))
            self._response_done(ex, conn)
        elif rest:
            self._relay(rest)

    def _send(self, ex: _Exchange, tr: ResponseTracker, data: bytes) -> None:
        self.transport.write(data)
        ex.sent = True
        if not ex.status and tr.final:
            ex.status = tr.status
            self._head_deadline = _INF
            self._ctx.metrics.request(tr.status)

    def _upgraded(self, ex: _Exchange, tr: ResponseTracker) -> None:
        """101: from here on both directions are plain bytes until either side closes."""
        if not ex.upgrade or tr.status != 101:
            self._bad_response(ex, "101 Switching Protocols to a request that asked for no upgrade")
            return
        self._tunnel = True
        self._rbuf = None
        stash = self._stash
        self._stash = None
        up = self._up
        if stash and up is not None:
            up.transport.write(stash)
            self._up_bytes += len(stash)
        self._unpause(_QUEUED)

    def _response_done(self, ex: _Exchange, conn: UpstreamConn) -> None:
        tr = conn.tracker
        self._up = None
        self._unpause(_UPSTREAM)
        # After HEAD the tracker's parser still expects the body its head announced: not reused.
        conn.finish(self._loop.time(), reusable=ex.req_done and not ex.is_head)
        if not tr.keep_alive or tr.extra:
            ex.keep_alive = False
        self._response_finished(ex)

    def _bad_response(self, ex: _Exchange, why: str) -> None:
        log.event("proxy.error", level="warning", vm=ex.vm_id, error=f"invalid response: {why}")
        self._drop_upstream()
        if ex.sent:
            self._close_client()
        else:
            self._answer(ex, 502, f"{self._where(ex)} sent an invalid HTTP response")

    def _drop_upstream(self) -> None:
        conn = self._up
        if conn is not None:
            self._up = None
            conn.close()
            self._unpause(_UPSTREAM)
        self._rbuf = None

    # -- flow control, timers, closing ---------------------------------------------------

    def _pause(self, why: int) -> None:
        was = self._paused
        if not was & why:
            self._paused = was | why
            if not was and not self._closing:
                self._paused_at = self._loop.time()
                self.transport.pause_reading()

    def _unpause(self, why: int) -> None:
        was = self._paused
        if was & why:
            self._paused = was & ~why
            if not self._paused and not self._closing:
                now = self._loop.time()
                self._paused_total += now - self._paused_at
                self._body_at = now  # a body's silence counts from when the client could send again
                self.transport.resume_reading()

    def _paused_for(self, now: float) -> float:
        """Seconds reading from this client was paused by the edge, in all."""
        return self._paused_total + (now - self._paused_at if self._paused else 0.0)

    def _flowing(self, now: float) -> None:
        """Bytes moved on a long exchange: count activity about once a second."""
        if now >= self._touch_at:
            self._touch_at = now + _TOUCH_EVERY
            ex = self._ex
            if ex is not None and ex.vm_id is not None:
                self._ctx.backend.touch(ex.vm_id)
            self._flush_bytes(now)

    def _flush_bytes(self, now: float) -> None:
        self._flush_at = now + _TOUCH_EVERY
        if self._up_bytes or self._down_bytes:
            self._ctx.metrics.proxied(self._up_bytes, self._down_bytes)
            self._up_bytes = self._down_bytes = 0

    def _arm(self, when: float) -> None:
        """Make sure the timer fires by `when`; it re-checks every deadline when it does."""
        if when < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(when, self._on_timer)
            self._timer_at = when

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = _INF
        if self._closed:
            return
        now = self._loop.time()
        if self._closing:
            if self._lingering:
                self._lingering = False
                self.transport.close()
                self._arm(now + _CLOSE_GRACE)
            else:
                self.transport.abort()
            return
        ex = self._ex
        if ex is None:
            if self._queue:
                return
            if now >= self._idle_deadline:
                self._close_client()
            else:
                self._arm(self._idle_deadline)
        else:
            self._check_exchange(ex, now)

    def _check_exchange(self, ex: _Exchange, now: float) -> None:
        """Deadlines of the request being answered: body arriving, response head coming."""
        next_at = _INF
        if self._parsing is ex:  # the client is still sending the body
            if self._paused:  # held or pushed back by us: not the client's fault
                next_at = now + min(self._s.idle_timeout, _PAUSED_RECHECK)
            else:
                overdue, next_at = self._body_check(ex, now)
                if overdue is not None:
                    log.event("proxy.client_timeout", level="info", vm=ex.vm_id, client=self._client, why=overdue)
                    self._ctx.metrics.slow_client()
                    if ex.sent:
                        self._close_client()
                    else:
                        self._answer(ex, 408, overdue)
                    return
        if self._up is not None and not ex.status and not self._tunnel and self._head_deadline < _INF:
            if now >= self._head_deadline:
                self._upstream_error(ex, 504, f"{self._where(ex)} did not answer within {self._s.read_timeout:g}s")
                return
            next_at = min(next_at, self._head_deadline)
        if next_at < _INF:
            self._arm(next_at)

    def _body_check(self, ex: _Exchange, now: float) -> tuple[str | None, float]:
        """Why the body being read is overdue (None: it is not), and when to check it next.

        Three limits: bytes must keep coming (idle_timeout), the whole body must arrive within
        body_timeout, and after body_rate_grace it must average body_min_rate bytes/s. Time
        the edge paused reading is not counted against the client.
        """
        s = self._s
        due = self._body_at + s.idle_timeout
        if now >= due:
            return f"no request body bytes for {s.idle_timeout:g}s", now
        elapsed = now - self._body_start - (self._paused_for(now) - self._body_paused)
        if s.body_timeout:
            if elapsed >= s.body_timeout:
                return f"the request body took longer than {s.body_timeout:g}s", now
            due = min(due, now + s.body_timeout - elapsed)
        if s.body_min_rate:
            need = max(s.body_rate_grace, ex.received / s.body_min_rate)
            if elapsed >= need:
                return f"the request body came slower than {s.body_min_rate} bytes/s", now
            due = min(due, now + need - elapsed)
        return None, due

    def _too_many_connections(self) -> None:
        """Over proxy.max_connections_per_ip: answer 429 without reading a request, then close."""
        s = self._s
        limit = s.max_connections_per_ip
        message = f"too many connections from this address (at most {limit})"
        self.transport.write(error_response(429, message, retry_after=s.retry_after))
        self._ctx.metrics.connection_refused("per_ip")
        self._close_client(linger=True)

    def _close_client(self, linger: bool = False) -> None:
        """Close after what was written; `linger` first reads off a body still arriving."""
        if self._closing:
            return
        self._closing = True
        self._teardown()
        t = self.transport
        now = self._loop.time()
        if linger and t.can_write_eof():
            t.write_eof()
            self._lingering = True
            if self._paused:
                self._paused = 0
                t.resume_reading()
            when = now + self._s.linger_timeout
        else:
            t.close()
            when = now + _CLOSE_GRACE
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = _INF
        self._arm(when)

    def _teardown(self) -> None:
        """Let go of everything this connection holds; the upstream is never pooled here."""
        task = self._task
        if task is not None:
            self._task = None
            task.cancel()
        self._drop_upstream()
        ex = self._ex
        if ex is not None and ex.counted:
            ex.counted = False
            assert ex.vm_id is not None
            self._ctx.stream_closed(ex.vm_id)
        self._queue.clear()
        self._stash = None
        self._tunnel = False
        self._flush_bytes(self._loop.time())


def make_protocol_factory(ctx: ProxyContext, forwarded_proto: str | None = None) -> Callable[[], asyncio.Protocol]:
    """For `loop.create_server(factory, host, port, ssl=...)`; one protocol per connection.

    `forwarded_proto` overrides the settings' X-Forwarded-Proto for this listener.
    """
    proto = (forwarded_proto or ctx.settings.forwarded_proto).encode("ascii")

    def factory() -> asyncio.Protocol:
        return EdgeProtocol(ctx, proto)

    return factory
