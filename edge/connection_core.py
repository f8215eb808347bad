"""One client connection's HTTP/1.1 handling with no I/O of its own (sans-IO).

Events come in as method calls: bytes from the client, the client gone or its write buffer
full, bytes or the end from the upstream, the upstream reached (or the VM woken, or why
not), a timer fired, the edge draining. Actions go out through `ConnectionIo` (send to the
client, pause or resume reading it, close, start a timer, take a pooled upstream, reach an
upstream) and through the `Upstream` at hand (send, pause, finish). Time comes from the
clock it is given: the event loop's in the edge, a list of numbers in a playbook test.

Request heads are parsed with llhttp (httptools) to route by Host, check the VM's token and
rewrite the head; bodies and responses then move as bytes, never as request objects. A read
that is the connection's last one-request read again, byte for byte (a keep-alive client
polling one URL), is that request again: admitted from the verdict kept for it, unparsed.
Requests on one connection are answered one at a time and in order: pipelined ones are
parsed ahead and wait (reading paused), so buffering stays within one read. Each request is
an `edge.exchange.Exchange`, decided on from its head by `edge.head_decision`; the answer is
relayed by an `edge.relay.ResponseRelay` and reading is paused and resumed by an
`edge.flow.ReadPauses`. The connection's states and their table of moves are in
`edge.connection_state`, the actions it asks for in `edge.connection_io`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from httptools import HttpRequestParser
from httptools.parser.errors import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from vmm.jsonlog import log

from .admission import Admitter, Refusal
from .connection_io import ConnectionIo, Upstream
from .connection_state import CONNECTION_MOVES, ConnectionState
from .errors_http import error_response
from .exchange import BodyState, Exchange, ExchangeState, IllegalMove
from .flow import QUEUED, UPSTREAM, WAITING, ReadPauses
from .head_decision import decide
from .proxy_context import ProxyContext
from .relay import DONE, GOING_ON, UPGRADED, ResponseRelay
from .reqhead import RequestHead
from .upstream import CONTROL_KEY, REPEAT_MAX

_LAST_CHUNK = b"0\r\n\r\n"
# Body bytes kept for a request waiting for its upstream. Reading goes on until then so a
# client that leaves is noticed (and its place among the held requests freed).
HOLD_BUFFER = 256 * 1024
TOUCH_EVERY = 1.0  # requests and long streams report activity (and bytes) at most this often
CLOSE_GRACE = 30.0  # a closing connection whose peer stops reading is aborted after this
_PAUSED_RECHECK = 1.0  # a body paused by the edge: its deadlines are looked at again this often
_INF = float("inf")
_C = ConnectionState
# Members as module names for the hot paths: a lookup on the enum class costs ~0.1 µs on 3.11.
_OPEN = _C.OPEN
_UPGRADING = _C.UPGRADING
_TUNNEL = _C.TUNNEL
_UNPARSEABLE = _C.UNPARSEABLE
_LINGERING = _C.LINGERING
_CLOSING = _C.CLOSING
_CLOSED = _C.CLOSED
_CONNECTING = ExchangeState.CONNECTING
_WAITING_FOR_VM = ExchangeState.WAITING_FOR_VM
_FORWARDED = ExchangeState.FORWARDED
_ANSWERED = ExchangeState.ANSWERED
_FINISHED = ExchangeState.FINISHED
_ARRIVING = BodyState.ARRIVING
_BODY_DONE = BodyState.DONE


class ConnectionCore:
    """Routes, authorises and relays the requests of one client connection."""

    def __init__(
        self, ctx: ProxyContext, forwarded_proto: bytes, io: ConnectionIo, clock: Callable[[], float]
    ) -> None:
        self._ctx = ctx
        self._settings = ctx.settings
        self._forwarded_proto = forwarded_proto
        self._io = io
        self._clock = clock
        # The head being parsed: llhttp hands each header field straight to it (a call less
        # per field); it is emptied for each request, not made anew.
        self._request_head = RequestHead()
        self.on_header = self._request_head.add
        self._parser = HttpRequestParser(self)  # takes the callbacks below (and on_header) now
        self.client = b"unknown"
        self._can_half_close = False
        self._target = b""
        self._in_head = False
        self._heads_begun = 0
        self._head_read = 0  # bytes of reads that fell wholly inside the head
        # The last read when it held exactly one bodiless keep-alive request, admitted with the verdict
        # the admitter keeps: the same bytes again are that request again (`_repeated`).
        self._repeat_read: bytes | None = None
        self._repeat_method = b""
        self._last_exchange: Exchange | None = None  # the one whose head was parsed last
        self._counted_client = False  # included in ctx.per_ip
        self._admitter: Admitter
        self.answering: Exchange | None = None  # the request being answered
        self._parsing: Exchange | None = None  # the request whose body is being read
        self._queue: deque[Exchange] = deque()
        # The upstream of the request being answered; between requests a client holds none, so
        # idle keep-alive clients cost no guest connections past the pool's bound.
        self._upstream: Upstream | None = None
        self._relay: ResponseRelay
        self._upgrade_stash: bytearray | None = None  # client bytes after an Upgrade request
        self.state = _OPEN
        self._draining = False  # the edge is stopping: close once the requests received are answered
        self._stream_vm: str | None = None  # the VM whose open_streams counts the request being answered
        self._pauses = ReadPauses(clock)
        self._client_write_paused = False
        self._timer_at = _INF
        self._idle_deadline = _INF
        self._response_deadline = _INF  # the upstream must have begun its answer by then
        self._bytes_to_upstream = 0
        self._bytes_to_client = 0
        self._touch_at = 0.0
        self._touched_vm: str | None = None  # the VM whose activity was recorded at `_touch_at` - 1 s
        self._flush_at = 0.0

    # -- events from the client ------------------------------------------------------------

    def connected(self, client: bytes, can_half_close: bool) -> None:
        """The client connected from `client` (its address); `can_half_close`: it has a FIN
        of its own to send (TLS has not)."""
        self.client = client
        self._can_half_close = can_half_close
        ctx = self._ctx
        self._send_client = self._io.send_client
        self._relay = ResponseRelay(self._send_client, ctx.metrics.request, self._settings.max_head_size)
        self._admitter = Admitter(
            ctx.backend, ctx.router, ctx.tokens, client, self._forwarded_proto, ctx.control_auth,
            trusted=ctx.settings.trusts(client),
        )  # fmt: skip
        now = self._clock()
        self._flush_at = now + TOUCH_EVERY
        ctx.connection_made(self._io)
        if self.state >= _LINGERING:  # drained as it arrived
            return
        if not ctx.client_opened(client):
            self._too_many_connections()
            return
        self._counted_client = True
        self._idle_deadline = now + self._settings.idle_timeout
        self._arm(self._idle_deadline)

    def client_data(self, data: bytes) -> None:
        state = self.state
        if state is _TUNNEL:
            upstream = self._upstream
            if upstream is not None:
                upstream.send(data)
                self._bytes_to_upstream += len(data)
                self._flowing(self._clock())
            return
        if state is _UPGRADING:
            stash = self._upgrade_stash
            assert stash is not None
            stash += data
            if len(stash) > self._settings.max_head_size:
                self._pause(QUEUED)
            return
        if state is not _OPEN:
            return
        in_head, heads_begun = self._in_head, self._heads_begun
        at_boundary = not in_head and self._parsing is None
        if at_boundary and data == self._repeat_read and self._repeated():
            return
        self._repeat_read = None
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as exc:
            if self._parsing is not None:  # CONNECT ends at its head
                self.on_message_complete()
            self._upgrade_stash = bytearray(data[exc.args[0] :])
            if self.state is _OPEN:
                self.move(_UPGRADING)
        except HttpParserCallbackError as exc:
            log.event("proxy.error", level="error", error=repr(exc.__context__ or exc))
            self._malformed(500, "the edge failed to handle this request")
        except HttpParserError as exc:
            self._malformed(400, f"malformed request: {exc}")
        else:
            if at_boundary and self._heads_begun == heads_begun + 1 and self._parsing is None:
                self._keep_if_repeatable(data)
            if self._in_head:
                if in_head and heads_begun == self._heads_begun:  # all of this read is head
                    self._head_read += len(data)  # (one header may sit in llhttp)
                head = self._request_head
                if max(self._head_read, len(self._target) + head.size) > self._settings.max_head_size:
                    self._malformed(431, "the request head is too large")
                elif head.fields > self._settings.max_headers:
                    self._malformed(431, f"the request head has more than {self._settings.max_headers} header fields")

    def client_lost(self) -> None:
        """The client's transport is gone (it left, or the edge closed it)."""
        self.move(_CLOSED)
        self._teardown()
        if self._counted_client:
            self._counted_client = False
            self._ctx.client_closed(self.client)
        self._ctx.connection_lost(self._io)
        self._timer_at = _INF
        self._io.cancel_timer()

    def client_write_paused(self) -> None:
        self._client_write_paused = True
        if self._upstream is not None:
            self._upstream.pause_reading()

    def client_write_resumed(self) -> None:
        self._client_write_paused = False
        if self._upstream is not None:
            self._upstream.resume_reading()

    def drain(self) -> None:
        """The edge is stopping: close now when between requests, else once they are answered."""
        self._draining = True
        if self.answering is None and not self._queue and not self._in_head and self.state < _LINGERING:
            self._close_client()

    # -- request parser callbacks (llhttp calls them inside client_data) --------------------

    def on_message_begin(self) -> None:
        self._request_head.reset()
        self._target = b""
        self._in_head = True
        self._heads_begun += 1
        self._head_read = 0

    def on_url(self, url: bytes) -> None:
        self._target += url

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self.state >= _LINGERING:
            return
        parser = self._parser
        head = self._request_head
        ex = Exchange(
            parser.get_method(), parser.should_keep_alive(), head.has_body, head.chunked, parser.should_upgrade()
        )
        self._parsing = self._last_exchange = ex
        if not decide(ex, self._admitter, self._settings, self._target, parser.get_http_version(), head):
            self._unparseable()
        self._answer_or_queue(ex)

    def on_body(self, body: bytes) -> None:
        ex = self._parsing
        if ex is None or ex.body_state is not _ARRIVING:
            return
        now = self._clock()
        ex.body_at = now
        ex.received += len(body)
        self._bytes_to_upstream += len(body)
        held = ex.body
        if ex.chunked:
            parts: tuple[bytes, ...] = (b"%x\r\n" % len(body), body, b"\r\n")
            if held is not None:
                held += parts
            elif self._upstream is not None:
                self._upstream.send_parts(parts)
        elif held is not None:
            held.append(body)
        elif self._upstream is not None:
            self._upstream.send(body)
        if held is not None:
            ex.buffered += len(body)
            if ex.buffered > HOLD_BUFFER:
                self._pause(WAITING)
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
                    self._upstream.send(_LAST_CHUNK)
            if ex is self.answering and self._upstream is not None:
                self._await_response()
        if ex.state is _ANSWERED:
            self._next(ex)

    # -- a request head sent again ---------------------------------------------------------

    def _keep_if_repeatable(self, data: bytes) -> None:
        """`data` began at a request's start and held all of one request: kept when it was a
        bodiless keep-alive one the admitter keeps the verdict of, so the same read again skips
        llhttp and admission (a keep-alive client polling one URL sends the same bytes each time)."""
        ex = self._last_exchange
        if (
            ex is not None
            and len(data) <= REPEAT_MAX
            and self.state is _OPEN
            and ex.keep_alive
            and not ex.has_body
            and ex.refusal is None
            and self._admitter.keeps(ex.head)
        ):
            self._repeat_read = data
            self._repeat_method = ex.method

    def _repeated(self) -> bool:
        """The read is the kept one again, byte for byte: llhttp would find the same one bodiless
        request in it (its state after a whole request is the same as before one), and admission
        the same verdict, which is only looked at again against the token's life and the VM's
        record. False when that verdict no longer holds: the read is then parsed like any other."""
        verdict = self._admitter.readmit()
        if verdict is None or verdict.h2c:
            return False
        ex = Exchange(self._repeat_method, True, False, False, False)
        ex.admit(verdict)
        ex.end_body()
        self._answer_or_queue(ex)
        return True

    def _answer_or_queue(self, ex: Exchange) -> None:
        """A request whose head is decided: answered now if none is before it, else it waits its turn
        with reading paused (pipelined requests are answered in order)."""
        if self.answering is None and not self._queue:
            self._activate(ex)
        else:
            self._queue.append(ex)
            self._pause(QUEUED)

    # -- events from reaching an upstream ------------------------------------------------

    def waiting_for_vm(self, ex: Exchange) -> None:
        ex.move(_WAITING_FOR_VM)

    def vm_woken(self, ex: Exchange) -> None:
        ex.move(_CONNECTING)

    def upstream_opened(self, ex: Exchange, upstream: Upstream) -> None:
        if self.answering is not ex or self.state >= _LINGERING:
            upstream.close()
            return
        self._attach(ex, upstream, reused=False)

    def reach_refused(self, ex: Exchange, refusal: Refusal) -> None:
        self._refused(ex, refusal)

    def reach_failed(self, ex: Exchange, status: int, message: str) -> None:
        self._upstream_error(ex, status, message)

    def reach_crashed(self, ex: Exchange, error: Exception) -> None:
        log.event("proxy.error", level="error", vm=ex.vm_id, error=repr(error))
        self._answer(ex, 500, "the edge failed to handle this request")

    # -- events from the upstream (UpstreamConn calls them on its owner) -------------------

    def upstream_data(self, data: bytes) -> None:
        self._bytes_to_client += len(data)
        if self.state is _TUNNEL:
            self._send_client(data)
            self._flowing(self._clock())
            return
        found = self._relay.feed(data)
        if found == GOING_ON:
            self._flowing(self._clock())
        elif found == DONE:
            self._response_done()
        elif found == UPGRADED:
            self._upgraded()
        else:
            self._bad_response(self._relay.problem)

    def upstream_lost(self, upstream: Upstream) -> None:
        if upstream is not self._upstream:
            return
        self._upstream = None
        self._relay.stop()
        self._unpause(UPSTREAM)
        ex = self.answering
        if ex is None:
            return
        if self.state is _TUNNEL:
            self._close_client()
        elif not ex.answer_started:
            if ex.retryable():
                ex.resent = True
                ex.body = []
                ex.move(_CONNECTING)
                self._io.reach(ex)
            else:
                self._upstream_error(ex, 502, f"{ex.where()} closed the connection without answering")
        else:  # the client learns where the answer ends from the connection closing
            ex.keep_alive = False
            self._close_client()

    def upstream_pause_writing(self) -> None:
        self._pause(UPSTREAM)

    def upstream_resume_writing(self) -> None:
        self._unpause(UPSTREAM)

    # -- the timer -----------------------------------------------------------------------

    def timer_fired(self) -> None:
        """The timer set last is due: every deadline is looked at again."""
        self._timer_at = _INF
        state = self.state
        if state is _CLOSED:
            return
        now = self._clock()
        if state is _LINGERING:
            self.move(_CLOSING)
            self._io.close_client()
            self._arm(now + CLOSE_GRACE)
            return
        if state is _CLOSING:
            self._io.abort_client()
            return
        ex = self.answering
        if ex is None:
            if self._queue:
                return
            if now >= self._idle_deadline:
                self._close_client()
            else:
                self._arm(self._idle_deadline)
        else:
            self._check_exchange(ex, now)

    def advance(self) -> None:
        """Go on with the next queued request (asked for by `_next`, outside the parser)."""
        if self.state >= _LINGERING or self.answering is not None or not self._queue:
            return
        ex = self._queue.popleft()
        if not self._queue:
            self._unpause(QUEUED)
        self._activate(ex)

    # -- deciding on a request -------------------------------------------------------------

    def _malformed(self, status: int, message: str) -> None:
        """The request stream cannot be parsed further: answer in turn, then close."""
        self._unparseable()
        ex = self._parsing
        self._parsing = None
        if ex is None:
            ex = Exchange(b"", False, False, False, False)
            ex.refuse(Refusal(status, message))
            ex.end_body()
            if self.answering is None and not self._queue:
                self._activate(ex)
            else:
                self._queue.append(ex)
            return
        ex.keep_alive = False
        ex.end_body()
        if ex is not self.answering:  # still queued: it gets the error instead
            ex.refuse(Refusal(status, message))
        else:
            self._fail(ex, status, message)

    def _activate(self, ex: Exchange) -> None:
        self.answering = ex
        if ex.refusal is not None:
            self._refused(ex, ex.refusal)
            return
        now = self._clock()
        vm_id = ex.vm_id
        if vm_id is not None:
            # A keep-alive client's requests count as activity once a second, as a long stream's
            # bytes do: the open request holds the VM meanwhile, and before an idle step the reaper
            # asks the VM's namespace when bytes last reached the guest.
            if now >= self._touch_at or vm_id != self._touched_vm:
                self._touched_vm = vm_id
                self._touch_at = now + TOUCH_EVERY
                self._ctx.backend.touch(vm_id)
            self._ctx.open_streams.opened(vm_id)
            self._stream_vm = vm_id
        if ex.has_body and ex.body_state is not _BODY_DONE:
            ex.body_at = ex.body_start = now
            ex.body_paused = self._pauses.paused_for(now)
            self._arm(ex.body_overdue(self._settings, now, ex.body_paused)[1])
        if ex.vm_was_running:
            upstream = self._io.take_pooled(vm_id or CONTROL_KEY, ex.port, now, ex.generation)
            if upstream is not None:
                self._attach(ex, upstream, reused=True)
                return
        ex.move(_CONNECTING)
        self._io.reach(ex)

    def _attach(self, ex: Exchange, upstream: Upstream, reused: bool) -> None:
        """Send the request head (and any body read so far) on `upstream`; relay from now on."""
        ex.move(_FORWARDED)
        self._upstream = upstream
        upstream.owner = self
        self._relay.start(ex, upstream.tracker)
        ex.reused = reused
        if self._client_write_paused:
            upstream.pause_reading()
        if upstream.write_paused:
            self._pause(UPSTREAM)
        self._response_deadline = _INF
        body = ex.body
        ex.body = None
        head = ex.head
        if body:
            upstream.send_parts([head, *body])
            self._bytes_to_upstream += sum(map(len, body))
        else:
            upstream.send(head)
        self._bytes_to_upstream += len(head)
        if ex.body_state is _BODY_DONE:
            self._await_response()
        if self._pauses.reasons & WAITING:
            self._unpause(WAITING)

    def _await_response(self) -> None:
        deadline = self._response_deadline = self._clock() + self._settings.read_timeout
        if deadline < self._timer_at:  # mostly not: the idle timer fires earlier and re-checks
            self._arm(deadline)

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
        self._io.cancel_reach()
        self._drop_upstream()
        self._unpause(WAITING)
        close = (
            not ex.keep_alive
            or self.state is _UNPARSEABLE
            or self._draining
            or (ex.has_body and ex.body_state is not _BODY_DONE)
        )
        data = error_response(
            status, message, reason=reason, close=close, retry_after=retry_after, bearer=bearer, body=not ex.is_head
        )
        self._send_client(data)
        self._bytes_to_client += len(data)
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
        vm_id = self._stream_vm
        if vm_id is not None:
            self._stream_vm = None
            self._ctx.open_streams.closed(vm_id)
        self.answering = None
        if not ex.keep_alive or (self._draining and not self._queue):
            # After a parse error the client may still be sending: read that off first.
            self._close_client(linger=self.state is _UNPARSEABLE)
            return
        if self._queue:
            self._io.advance_soon()  # not recursively: a read can hold many requests
            return
        if self._pauses.reasons & QUEUED:
            self._unpause(QUEUED)
        now = self._clock()
        if now >= self._flush_at:
            self._flush_bytes(now)
        idle_deadline = self._idle_deadline = now + self._settings.idle_timeout
        if idle_deadline < self._timer_at:
            self._arm(idle_deadline)

    # -- the answer --------------------------------------------------------------------------

    def _upgraded(self) -> None:
        """101: from here on both directions are plain bytes until either side closes."""
        ex = self.answering
        assert ex is not None
        relay = self._relay
        if not ex.upgrade or ex.status != 101:
            self._bad_response("101 Switching Protocols to a request that asked for no upgrade")
            return
        rest = relay.rest
        relay.stop()
        self.move(_TUNNEL)
        stash = self._upgrade_stash
        self._upgrade_stash = None
        upstream = self._upstream
        if stash and upstream is not None:
            upstream.send(bytes(stash))
            self._bytes_to_upstream += len(stash)
        self._unpause(QUEUED)
        if rest:
            self._send_client(rest)

    def _response_done(self) -> None:
        ex = self.answering
        upstream = self._upstream
        assert ex is not None and upstream is not None
        tracker = upstream.tracker
        self._upstream = None
        if self._pauses.reasons & UPSTREAM:
            self._unpause(UPSTREAM)
        # After HEAD the tracker's parser still expects the body its head announced: not reused.
        upstream.finish(self._clock(), reusable=ex.body_state is _BODY_DONE and not ex.is_head)
        if not tracker.keep_alive or tracker.extra:
            ex.keep_alive = False
        self._response_finished(ex)

    def _bad_response(self, why: str) -> None:
        ex = self.answering
        assert ex is not None
        log.event("proxy.error", level="warning", vm=ex.vm_id, error=f"invalid response: {why}")
        self._drop_upstream()
        self._fail(ex, 502, f"{ex.where()} sent an invalid HTTP response")

    def _drop_upstream(self) -> None:
        upstream = self._upstream
        if upstream is not None:
            self._upstream = None
            upstream.close()
            self._unpause(UPSTREAM)
        self._relay.stop()

    # -- flow control, timers, closing -----------------------------------------------------

    def _pause(self, why: int) -> None:
        if self._pauses.add(why) and self.state < _LINGERING:
            self._io.pause_client()

    def _unpause(self, why: int) -> None:
        now = self._pauses.remove(why)
        if now and self.state < _LINGERING:
            ex = self._parsing
            if ex is not None:  # a body's silence counts from when the client could send again
                ex.body_at = now
            self._io.resume_client()

    def _flowing(self, now: float) -> None:
        """Bytes moved on a long exchange: count activity about once a second."""
        if now >= self._touch_at:
            self._touch_at = now + TOUCH_EVERY
            ex = self.answering
            if ex is not None and ex.vm_id is not None:
                self._ctx.backend.touch(ex.vm_id)
            self._flush_bytes(now)

    def _flush_bytes(self, now: float) -> None:
        self._flush_at = now + TOUCH_EVERY
        if self._bytes_to_upstream or self._bytes_to_client:
            self._ctx.metrics.proxied(self._bytes_to_upstream, self._bytes_to_client)
            self._bytes_to_upstream = self._bytes_to_client = 0

    def _arm(self, when: float) -> None:
        """Make sure the timer fires by `when`; it re-checks every deadline when it does."""
        if when < self._timer_at:
            self._timer_at = when
            self._io.set_timer(when)

    def _check_exchange(self, ex: Exchange, now: float) -> None:
        """Deadlines of the request being answered: body arriving, response head coming."""
        next_at = _INF
        settings = self._settings
        if self._parsing is ex:  # the client is still sending the body
            if self._pauses.reasons:  # held or pushed back by us: not the client's fault
                next_at = now + min(settings.idle_timeout, _PAUSED_RECHECK)
            else:
                overdue, next_at = ex.body_overdue(settings, now, self._pauses.paused_for(now))
                if overdue is not None:
                    log.event("proxy.client_timeout", level="info", vm=ex.vm_id, client=self.client, why=overdue)
                    self._ctx.metrics.slow_client()
                    self._fail(ex, 408, overdue)
                    return
        deadline = self._response_deadline
        if self._upstream is not None and not ex.status and self.state is not _TUNNEL and deadline < _INF:
            if now >= deadline:
                self._upstream_error(ex, 504, f"{ex.where()} did not answer within {settings.read_timeout:g}s")
                return
            next_at = min(next_at, deadline)
        if next_at < _INF:
            self._arm(next_at)

    def _too_many_connections(self) -> None:
        """Over proxy.max_connections_per_ip: answer 429 without reading a request, then close."""
        settings = self._settings
        limit = settings.max_connections_per_ip
        message = f"too many connections from this address (at most {limit})"
        self._send_client(error_response(429, message, retry_after=settings.retry_after))
        self._ctx.metrics.connection_refused("per_ip")
        self._close_client(linger=True)

    def _close_client(self, linger: bool = False) -> None:
        """Close after what was written; `linger` first reads off a body still arriving."""
        if self.state >= _LINGERING:
            return
        lingering = linger and self._can_half_close
        self.move(_LINGERING if lingering else _CLOSING)
        self._teardown()
        now = self._clock()
        io = self._io
        if lingering:
            io.half_close_client()
            if self._pauses.clear():
                io.resume_client()
            when = now + self._settings.linger_timeout
        else:
            io.close_client()
            when = now + CLOSE_GRACE
        self._timer_at = when
        io.set_timer(when)

    def _teardown(self) -> None:
        """Let go of everything this connection holds; the upstream is never pooled here."""
        self._io.cancel_reach()
        self._drop_upstream()
        self._release_stream()
        self._queue.clear()
        self._upgrade_stash = None
        self._flush_bytes(self._clock())

    def _release_stream(self) -> None:
        vm_id = self._stream_vm
        if vm_id is not None:
            self._stream_vm = None
            self._ctx.open_streams.closed(vm_id)

    def move(self, new: ConnectionState) -> None:
        if new not in CONNECTION_MOVES[self.state]:
            raise IllegalMove(f"client connection {self.state.name} -> {new.name}")
        self.state = new

    def _unparseable(self) -> None:
        """No more requests are read: those received are answered, then the connection closes."""
        if self.state is _OPEN:
            self.move(_UNPARSEABLE)
