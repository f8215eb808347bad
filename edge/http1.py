"""The client side of the edge: one asyncio Protocol per client connection.

Request heads are parsed with llhttp (httptools) to route by Host, check the VM's token
and rewrite the head; bodies and responses then move as bytes, never as request objects.
Requests on one connection are answered one at a time and in order: pipelined ones are
parsed ahead and wait (reading paused), so buffering stays within one read.

Each request is an `edge.exchange.Exchange`, whose states say how far it has come; the
connection's own `ConnectionState` says what is done with the bytes the client sends.
This protocol parses, orchestrates the exchanges in turn, relays the answers and keeps
the connection's timers and flow control.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable
from typing import cast

from httptools import HttpRequestParser
from httptools.parser.errors import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from vmm.errors import VmmError
from vmm.jsonlog import log

from .admission import Admitter, Refusal
from .errors_http import error_response
from .exchange import BodyState, Exchange, ExchangeState, IllegalMove
from .proxy_context import ProxyContext
from .reqhead import RequestHead
from .upstream import CONTROL_KEY, ResponseTracker, UpstreamConn, take_head

# Why reading from the client is paused; it resumes when no reason is left.
_WAITING = 1  # the request waiting for a wake or a connection has buffered enough body
_QUEUED = 2  # later requests are parsed and wait their turn (or bytes after an Upgrade)
_UPSTREAM = 4  # the upstream's write buffer is full

_LAST_CHUNK = b"0\r\n\r\n"
# Body bytes kept for a request waiting for its upstream. Reading goes on until then so a
# client that leaves is noticed (and its place among the held requests freed).
_HOLD_BUFFER = 256 * 1024
_TOUCH_EVERY = 1.0  # long streams report activity (and bytes) at most this often
_CLOSE_GRACE = 30.0  # a closing connection whose peer stops reading is aborted after this
_PAUSED_RECHECK = 1.0  # a body paused by the edge: its deadlines are looked at again this often
_INF = float("inf")


class ConnectionState(enum.IntEnum):
    """What a client connection does with the bytes it reads. It only moves down this list,
    and from LINGERING on it is closing: what it reads is no longer acted on.

    OPEN -> UPGRADING -> TUNNEL for a 101; OPEN -> UNPARSEABLE after a parse error; any of
    those -> LINGERING or CLOSING -> CLOSED. Whether the edge is draining is separate: a
    draining connection still answers what it received, in any of the first four states.
    """

    OPEN = enum.auto()  # request heads are parsed, bodies read
    UPGRADING = enum.auto()  # an Upgrade request was parsed: later bytes are kept for the tunnel
    TUNNEL = enum.auto()  # after a 101: bytes go both ways as they are until either side closes
    UNPARSEABLE = enum.auto()  # the request stream is broken: what was received is answered, then close
    LINGERING = enum.auto()  # answered and half-closed: a body still arriving is read off for linger_timeout
    CLOSING = enum.auto()  # closed after what was written; aborted if the peer stops reading
    CLOSED = enum.auto()  # connection_lost ran


_C = ConnectionState
_ENDS = (_C.LINGERING, _C.CLOSING, _C.CLOSED)
_CONNECTION_MOVES: dict[ConnectionState, frozenset[ConnectionState]] = {
    _C.OPEN: frozenset((_C.UPGRADING, _C.UNPARSEABLE, *_ENDS)),
    _C.UPGRADING: frozenset((_C.TUNNEL, *_ENDS)),
    _C.TUNNEL: frozenset(_ENDS),
    _C.UNPARSEABLE: frozenset(_ENDS),
    _C.LINGERING: frozenset((_C.CLOSING, _C.CLOSED)),
    _C.CLOSING: frozenset((_C.CLOSED,)),
    _C.CLOSED: frozenset(),
}
# Members as module names for the hot paths: a lookup on the enum class costs ~0.1 µs on 3.11.
_OPEN = _C.OPEN
_UPGRADING = _C.UPGRADING
_TUNNEL = _C.TUNNEL
_UNPARSEABLE = _C.UNPARSEABLE
_LINGERING = _C.LINGERING
_CLOSING = _C.CLOSING
_CLOSED = _C.CLOSED
_CONNECTING = ExchangeState.CONNECTING
_FORWARDED = ExchangeState.FORWARDED
_STREAMING = ExchangeState.STREAMING
_ANSWERED = ExchangeState.ANSWERED
_FINISHED = ExchangeState.FINISHED
_ARRIVING = BodyState.ARRIVING
_BODY_DONE = BodyState.DONE


class EdgeProtocol(asyncio.Protocol):
    """Routes, authorises and splices the requests of one client connection."""

    transport: asyncio.Transport

    def __init__(self, ctx: ProxyContext, forwarded_proto: bytes) -> None:
        self._ctx = ctx
        self._settings = ctx.settings
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
        self._ex: Exchange | None = None  # the request being answered
        self._parsing: Exchange | None = None  # the request whose body is being read
        self._queue: deque[Exchange] = deque()
        # The upstream of the request being answered; between requests a client holds none, so
        # idle keep-alive clients cost no guest connections past the pool's bound.
        self._upstream: UpstreamConn | None = None
        self._response_head: bytearray | None = None  # a response head being collected (HEAD, Set-Cookie)
        self._stash: bytearray | None = None  # client bytes after an Upgrade request
        self._state = _OPEN
        self._draining = False  # the edge is stopping: close once the requests received are answered
        self._stream_vm: str | None = None  # the VM whose open_streams counts the request being answered
        self._paused = 0
        self._write_paused = False
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _INF
        self._idle_deadline = _INF
        self._head_deadline = _INF
        self._up_bytes = 0
        self._down_bytes = 0
        self._touch_at = 0.0
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
        if self._state >= _LINGERING:  # drained as it arrived
            return
        if not ctx.client_opened(self._client):
            self._too_many_connections()
            return
        self._counted_ip = True
        self._idle_deadline = now + self._settings.idle_timeout
        self._arm(self._idle_deadline)

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state is _TUNNEL:
            up = self._upstream
            if up is not None:
                up.transport.write(data)
                self._up_bytes += len(data)
                self._flowing(self._loop.time())
            return
        if state is _UPGRADING:
            stash = self._stash
            assert stash is not None
            stash += data
            if len(stash) > self._settings.max_head_size:
                self._pause(_QUEUED)
            return
        if state is not _OPEN:
            return
        in_head, msgs = self._in_head, self._msgs
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as exc:
            if self._parsing is not None:  # CONNECT ends at its head
                self.on_message_complete()
            self._stash = bytearray(data[exc.args[0] :])
            if self._state is _OPEN:
                self._move(_UPGRADING)
        except HttpParserCallbackError as exc:
            log.event("proxy.error", level="error", error=repr(exc.__context__ or exc))
            self._malformed(500, "the edge failed to handle this request")
        except HttpParserError as exc:
            self._malformed(400, f"malformed request: {exc}")
        else:
            if self._in_head:
                if in_head and msgs == self._msgs:  # all of this read is head (one header may sit in llhttp)
                    self._head_raw += len(data)
                if max(self._head_raw, self._head_bytes) > self._settings.max_head_size:
                    self._malformed(431, "the request head is too large")
                elif self._headers > self._settings.max_headers:
                    self._malformed(431, f"the request head has more than {self._settings.max_headers} header fields")

    def eof_received(self) -> bool:
        # Like nginx, a client's FIN is taken as leaving (browsers never half-close): held
        # and in-flight requests are dropped and their upstreams closed by connection_lost.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._move(_CLOSED)
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
        if self._upstream is not None:
            self._upstream.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._upstream is not None:
            self._upstream.resume_reading()

    def drain(self) -> None:
        """The edge is stopping: close now when between requests, else once they are answered."""
        self._draining = True
        if self._ex is None and not self._queue and not self._in_head and self._state < _LINGERING:
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
        if self._state >= _LINGERING:
            return
        p = self._parser
        req = self._req
        ex = Exchange(p.get_method(), p.should_keep_alive(), req.has_body, req.chunked, p.should_upgrade())
        self._parsing = ex
        if self._head_bytes > self._settings.max_head_size:
            self._unparseable()
            ex.keep_alive = False
            ex.refuse(Refusal(431, "the request head is too large"))
        elif self._headers > self._settings.max_headers:
            self._unparseable()
            ex.keep_alive = False
            ex.refuse(Refusal(431, f"the request head has more than {self._settings.max_headers} header fields"))
        else:
            try:
                verdict = self._admitter.admit(ex.method, self._url, p.get_http_version(), req, ex.upgrade)
            except Exception as exc:  # a bug in admission must still answer, never leave the client hanging
                log.event("edge.admission_error", level="error", error=repr(exc))
                ex.keep_alive = False
                verdict = Refusal(400, "the request could not be admitted")
            if isinstance(verdict, Refusal):
                ex.refuse(verdict)
            else:
                ex.admit(verdict)
        if self._ex is None and not self._queue:
            self._activate(ex)
        else:
            self._queue.append(ex)
            self._pause(_QUEUED)

    def on_body(self, body: bytes) -> None:
        ex = self._parsing
        if ex is None or ex.body_state is not _ARRIVING:
            return
        now = self._loop.time()
        ex.body_at = now
        ex.received += len(body)
        self._up_bytes += len(body)
        if ex.chunked:
            parts: tuple[bytes, ...] = (b"%x\r\n" % len(body), body, b"\r\n")
            if ex.body is not None:
                ex.body += parts
            elif self._upstream is not None:
                self._upstream.transport.writelines(parts)
        elif ex.body is not None:
            ex.body.append(body)
        elif self._upstream is not None:
            self._upstream.transport.write(body)
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
        if ex.end_body():
            if ex.chunked:
                if ex.body is not None:
                    ex.body.append(_LAST_CHUNK)
                elif self._upstream is not None:
                    self._upstream.transport.write(_LAST_CHUNK)
            if ex is self._ex and self._upstream is not None:
                self._await_head()
        if ex.state is _ANSWERED:
            self._next(ex)

    # -- deciding on a request -----------------------------------------------------------

    def _malformed(self, status: int, message: str) -> None:
        """The request stream cannot be parsed further: answer in turn, then close."""
        self._unparseable()
        ex = self._parsing
        self._parsing = None
        if ex is None:
            ex = Exchange(b"", False, False, False, False)
            ex.refuse(Refusal(status, message))
            ex.end_body()
            if self._ex is None and not self._queue:
                self._activate(ex)
            else:
                self._queue.append(ex)
            return
        ex.keep_alive = False
        ex.end_body()
        if ex is not self._ex:  # still queued: it gets the error instead
            ex.refuse(Refusal(status, message))
        else:
            self._fail(ex, status, message)

    # -- answering ---------------------------------------------------------------------

    def _activate(self, ex: Exchange) -> None:
        self._ex = ex
        if ex.refusal is not None:
            self._refused(ex, ex.refusal)
            return
        ctx = self._ctx
        now = self._loop.time()
        vm_id = ex.vm_id
        if vm_id is not None:
            ctx.backend.touch(vm_id)
            ctx.stream_opened(vm_id)
            self._stream_vm = vm_id
            self._touch_at = now + _TOUCH_EVERY
        if ex.has_body and ex.body_state is not _BODY_DONE:
            ex.body_at = ex.body_start = now
            ex.body_paused = self._paused_for(now)
            self._arm(ex.body_overdue(self._settings, now, ex.body_paused)[1])
        if ex.vm_was_running:
            key = vm_id or CONTROL_KEY
            conn = ctx.pool.acquire(key, ex.port, now, ex.generation)
            if conn is not None:
                self._attach(ex, conn, reused=True)
                return
        self._start_task(ex)

    def _start_task(self, ex: Exchange) -> None:
        ex.move(_CONNECTING)
        self._task = self._loop.create_task(self._prepare(ex))

    async def _prepare(self, ex: Exchange) -> None:
        """Wake the VM if needed and open a connection to it; body bytes meanwhile are buffered.

        A connect that fails has sent nothing: the VM's owner is asked to make it run (this
        edge's view of it may be a moment old, e.g. just suspended by its host) and the
        connect is tried once more.
        """
        try:
            if not ex.vm_running(self._ctx.backend):
                refusal = await ex.wait_for_vm(self._ctx)
                if refusal is not None:
                    self._refused(ex, refusal)
                    return
            try:
                conn = await ex.connect(self._ctx)
            except (OSError, TimeoutError, VmmError) as exc:
                if ex.vm_id is None or ex.reconnected:
                    raise
                ex.reconnected = True
                log.event("proxy.reconnect", level="info", vm=ex.vm_id, port=ex.port, error=str(exc) or repr(exc))
                refusal = await ex.wait_for_vm(self._ctx, recheck=True)
                if refusal is not None:
                    self._refused(ex, refusal)
                    return
                conn = await ex.connect(self._ctx)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            self._upstream_error(ex, 504, f"no connection to {ex.where()} within {self._settings.connect_timeout:g}s")
            return
        except VmmError as exc:
            self._upstream_error(ex, exc.http_status, str(exc))
            return
        except OSError as exc:
            self._upstream_error(ex, 502, f"cannot connect to {ex.where()}: {exc.strerror or exc}")
            return
        except Exception as exc:
            log.event("proxy.error", level="error", vm=ex.vm_id, error=repr(exc))
            self._answer(ex, 500, "the edge failed to handle this request")
            return
        finally:
            if self._task is asyncio.current_task():
                self._task = None
        if self._ex is not ex or self._state >= _LINGERING:
            conn.close()
            return
        self._attach(ex, conn, reused=False)

    def _attach(self, ex: Exchange, conn: UpstreamConn, reused: bool) -> None:
        """Send the request head (and any body read so far) on `conn`; relay from now on."""
        ex.move(_FORWARDED)
        self._upstream = conn
        conn.owner = self
        conn.tracker.reset()
        ex.reused = reused
        if self._write_paused:
            conn.pause_reading()
        if conn.write_paused:
            self._pause(_UPSTREAM)
        self._response_head = bytearray() if ex.is_head or ex.cookie is not None else None
        self._head_deadline = _INF
        body = ex.body
        ex.body = None
        if body:
            conn.transport.writelines([ex.head, *body])
            self._up_bytes += sum(map(len, body))
        else:
            conn.transport.write(ex.head)
        self._up_bytes += len(ex.head)
        if ex.body_state is _BODY_DONE:
            self._await_head()
        self._unpause(_WAITING)

    def _await_head(self) -> None:
        self._head_deadline = self._loop.time() + self._settings.read_timeout
        self._arm(self._head_deadline)

    def _answer(
        self,
        ex: Exchange,
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
        close = (
            not ex.keep_alive
            or self._state is _UNPARSEABLE
            or self._draining
            or (ex.has_body and ex.body_state is not _BODY_DONE)
        )
        data = error_response(
            status, message, reason=reason, close=close, retry_after=retry_after, bearer=bearer, body=not ex.is_head
        )
        self.transport.write(data)
        self._down_bytes += len(data)
        ex.status = status
        ex.drop_body()
        if close:
            ex.keep_alive = False
        self._ctx.metrics.request(status)
        self._response_finished(ex)

    def _refused(self, ex: Exchange, refusal: Refusal) -> None:
        self._answer(
            ex, refusal.status, refusal.message,
            reason=refusal.reason, bearer=refusal.bearer, retry_after=refusal.retry_after,
        )  # fmt: skip

    def _fail(self, ex: Exchange, status: int, message: str, retry_after: int | None = None) -> None:
        """`ex` cannot be answered as it should: with the edge's error while nothing of an answer
        went out, else by closing (the client sees the answer cut short)."""
        if ex.answer_started:
            self._close_client()
        else:
            self._answer(ex, status, message, retry_after=retry_after)

    def _upstream_error(self, ex: Exchange, status: int, message: str) -> None:
        log.event("proxy.error", level="warning", vm=ex.vm_id, port=ex.port, status=status, error=message)
        self._fail(ex, status, message, self._settings.retry_after if status == 503 else None)

    def _response_finished(self, ex: Exchange) -> None:
        ex.move(_ANSWERED)
        if ex.body_state is _BODY_DONE:
            self._next(ex)
        elif ex.has_body:  # the rest of the body is not wanted: read it off briefly, then close
            ex.drop_body()
            self._close_client(linger=True)
        # else: the request's end is in the bytes being parsed; on_message_complete moves on

    def _next(self, ex: Exchange) -> None:
        """The exchange is over: go on with the next request, or close."""
        ex.move(_FINISHED)
        self._release_stream()
        self._ex = None
        if not ex.keep_alive or (self._draining and not self._queue):
            # After a parse error the client may still be sending: read that off first.
            self._close_client(linger=self._state is _UNPARSEABLE)
            return
        if self._queue:
            self._loop.call_soon(self._advance)  # not recursively: a read can hold many requests
            return
        self._unpause(_QUEUED)
        now = self._loop.time()
        if now >= self._flush_at:
            self._flush_bytes(now)
        self._idle_deadline = now + self._settings.idle_timeout
        self._arm(self._idle_deadline)

    def _advance(self) -> None:
        if self._state >= _LINGERING or self._ex is not None or not self._queue:
            return
        ex = self._queue.popleft()
        if not self._queue:
            self._unpause(_QUEUED)
        self._activate(ex)

    # -- the upstream side (called by UpstreamConn) ----------------------------------------

    def upstream_data(self, data: bytes) -> None:
        self._down_bytes += len(data)
        if self._state is _TUNNEL:
            self.transport.write(data)
            self._flowing(self._loop.time())
        elif self._response_head is not None:
            self._collect_head(data)
        else:
            self._relay(data)

    def upstream_lost(self, conn: UpstreamConn) -> None:
        if conn is not self._upstream:
            return
        self._upstream = None
        self._unpause(_UPSTREAM)
        ex = self._ex
        if ex is None:
            return
        if self._state is _TUNNEL:
            self._close_client()
        elif not ex.answer_started:
            if ex.retryable():
                ex.resent = True
                ex.body = []
                self._response_head = None
                self._start_task(ex)
            else:
                self._upstream_error(ex, 502, f"{ex.where()} closed the connection without answering")
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
        conn = self._upstream
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
        conn = self._upstream
        buf = self._response_head
        assert ex is not None and conn is not None and buf is not None
        buf += data
        tr = conn.tracker
        while True:
            head = take_head(buf)
            if head is None:
                if len(buf) > self._settings.max_head_size:
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
        self._response_head = None
        rest = bytes(buf)
        if ex.cookie is not None:
            eol = head.index(b"\r\n") + 2
            head = head[:eol] + ex.cookie + head[eol:]
        self._send(ex, tr, head)
        if upgraded:
            self._upgraded(ex, tr)
            if rest and self._state is _TUNNEL:
                self.transport.write(rest)
        elif ex.is_head or tr.done:
            tr.head_ends_it(bool(rest))
            self._response_done(ex, conn)
        elif rest:
            self._relay(rest)

    def _send(self, ex: Exchange, tr: ResponseTracker, data: bytes) -> None:
        self.transport.write(data)
        if ex.state is _FORWARDED:
            ex.move(_STREAMING)
        if not ex.status and tr.final:
            ex.status = tr.status
            self._head_deadline = _INF
            self._ctx.metrics.request(tr.status)

    def _upgraded(self, ex: Exchange, tr: ResponseTracker) -> None:
        """101: from here on both directions are plain bytes until either side closes."""
        if not ex.upgrade or tr.status != 101:
            self._bad_response(ex, "101 Switching Protocols to a request that asked for no upgrade")
            return
        self._move(_TUNNEL)
        self._response_head = None
        stash = self._stash
        self._stash = None
        up = self._upstream
        if stash and up is not None:
            up.transport.write(stash)
            self._up_bytes += len(stash)
        self._unpause(_QUEUED)

    def _response_done(self, ex: Exchange, conn: UpstreamConn) -> None:
        tr = conn.tracker
        self._upstream = None
        self._unpause(_UPSTREAM)
        # After HEAD the tracker's parser still expects the body its head announced: not reused.
        conn.finish(self._loop.time(), reusable=ex.body_state is _BODY_DONE and not ex.is_head)
        if not tr.keep_alive or tr.extra:
            ex.keep_alive = False
        self._response_finished(ex)

    def _bad_response(self, ex: Exchange, why: str) -> None:
        log.event("proxy.error", level="warning", vm=ex.vm_id, error=f"invalid response: {why}")
        self._drop_upstream()
        self._fail(ex, 502, f"{ex.where()} sent an invalid HTTP response")

    def _drop_upstream(self) -> None:
        conn = self._upstream
        if conn is not None:
            self._upstream = None
            conn.close()
            self._unpause(_UPSTREAM)
        self._response_head = None

    # -- flow control, timers, closing ---------------------------------------------------

    def _pause(self, why: int) -> None:
        was = self._paused
        if not was & why:
            self._paused = was | why
            if not was and self._state < _LINGERING:
                self._paused_at = self._loop.time()
                self.transport.pause_reading()

    def _unpause(self, why: int) -> None:
        was = self._paused
        if was & why:
            self._paused = was & ~why
            if not self._paused and self._state < _LINGERING:
                now = self._loop.time()
                self._paused_total += now - self._paused_at
                ex = self._parsing
                if ex is not None:  # a body's silence counts from when the client could send again
                    ex.body_at = now
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
        state = self._state
        if state is _CLOSED:
            return
        now = self._loop.time()
        if state is _LINGERING:
            self._move(_CLOSING)
            self.transport.close()
            self._arm(now + _CLOSE_GRACE)
            return
        if state is _CLOSING:
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

    def _check_exchange(self, ex: Exchange, now: float) -> None:
        """Deadlines of the request being answered: body arriving, response head coming."""
        next_at = _INF
        if self._parsing is ex:  # the client is still sending the body
            if self._paused:  # held or pushed back by us: not the client's fault
                next_at = now + min(self._settings.idle_timeout, _PAUSED_RECHECK)
            else:
                overdue, next_at = ex.body_overdue(self._settings, now, self._paused_for(now))
                if overdue is not None:
                    log.event("proxy.client_timeout", level="info", vm=ex.vm_id, client=self._client, why=overdue)
                    self._ctx.metrics.slow_client()
                    self._fail(ex, 408, overdue)
                    return
        if self._upstream is not None and not ex.status and self._state is not _TUNNEL and self._head_deadline < _INF:
            if now >= self._head_deadline:
                self._upstream_error(ex, 504, f"{ex.where()} did not answer within {self._settings.read_timeout:g}s")
                return
            next_at = min(next_at, self._head_deadline)
        if next_at < _INF:
            self._arm(next_at)

    def _too_many_connections(self) -> None:
        """Over proxy.max_connections_per_ip: answer 429 without reading a request, then close."""
        s = self._settings
        limit = s.max_connections_per_ip
        message = f"too many connections from this address (at most {limit})"
        self.transport.write(error_response(429, message, retry_after=s.retry_after))
        self._ctx.metrics.connection_refused("per_ip")
        self._close_client(linger=True)

    def _close_client(self, linger: bool = False) -> None:
        """Close after what was written; `linger` first reads off a body still arriving."""
        if self._state >= _LINGERING:
            return
        t = self.transport
        lingering = linger and t.can_write_eof()
        self._move(_LINGERING if lingering else _CLOSING)
        self._teardown()
        now = self._loop.time()
        if lingering:
            t.write_eof()
            if self._paused:
                self._paused = 0
                t.resume_reading()
            when = now + self._settings.linger_timeout
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
        self._release_stream()
        self._queue.clear()
        self._stash = None
        self._flush_bytes(self._loop.time())

    def _release_stream(self) -> None:
        vm_id = self._stream_vm
        if vm_id is not None:
            self._stream_vm = None
            self._ctx.stream_closed(vm_id)

    def _move(self, new: ConnectionState) -> None:
        if new not in _CONNECTION_MOVES[self._state]:
            raise IllegalMove(f"client connection {self._state.name} -> {new.name}")
        self._state = new

    def _unparseable(self) -> None:
        """No more requests are read: those received are answered, then the connection closes."""
        if self._state is _OPEN:
            self._move(_UNPARSEABLE)


def make_protocol_factory(ctx: ProxyContext, forwarded_proto: str | None = None) -> Callable[[], asyncio.Protocol]:
    """For `loop.create_server(factory, host, port, ssl=...)`; one protocol per connection.

    `forwarded_proto` overrides the settings' X-Forwarded-Proto for this listener.
    """
    proto = (forwarded_proto or ctx.settings.forwarded_proto).encode("ascii")

    def factory() -> asyncio.Protocol:
        return EdgeProtocol(ctx, proto)

    return factory
