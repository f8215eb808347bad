"""One HTTP/2 request stream, relayed to an HTTP/1.1 guest port: the translation both ways.

The request's pseudo-headers and headers become a `RequestHead`, so admission is the same
as HTTP/1.1's (`:authority` for Host; the token from Authorization, `?token=` or the cookie;
scopes and ports) and so is the head the guest receives. A body without a content-length goes
chunked. Waking and connecting are `edge.reach`'s, with the same rules: a pooled guest
connection only in its generation, a request resent only when idempotent, bodiless and on a
fresh connection. The answer is parsed with llhttp and goes out as HEADERS and DATA frames as
it comes (no buffering past the client's window: then the guest is read no further).

Repeats cost less, as HTTP/1.1's do: a bodiless stream whose header list is the connection's last
admitted one again takes the admitter's kept verdict (`Admitter.kept_method`, `readmit`), and a
guest's answer that is its connection's kept one again (`UpstreamConn.answer`) goes out unparsed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import orjson
from h2.errors import ErrorCodes
from hpack import NeverIndexedHeaderTuple
from httptools import HttpResponseParser
from httptools.parser.errors import HttpParserError

from vmm.jsonlog import log

from .admission import Admission, Refusal
from .errors_http import error_code
from .exchange import Exchange, ExchangeState
from .h2c_relay import GuestH2c, H2cRelay, shared
from .reqhead import RequestHead
from .upstream import CONTROL_KEY, REPEAT_MAX, KeptAnswer, UpstreamConn

if TYPE_CHECKING:
    from .h2_core import H2Core

_LAST_CHUNK = b"0\r\n\r\n"
_HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))
_INF = float("inf")
TOUCH_EVERY = 1.0


def _cookie(line: bytes) -> NeverIndexedHeaderTuple:
    """The edge's Set-Cookie line (it carries a token) as a header HPACK never adds to its table."""
    return NeverIndexedHeaderTuple(b"set-cookie", line.partition(b": ")[2].rstrip(b"\r\n"))


class H2Stream:
    """A request on an HTTP/2 connection: an Exchange, its upstream, and the answer's translation."""

    __slots__ = (
        "_answer_head",
        "_bad",
        "_body",
        "_close_delimited",
        "_complete",
        "_down",
        "_fields",
        "_final",
        "_framed",
        "_head",
        "_headers",
        "_method",
        "_one_answer",
        "_parser",
        "_paused_guest",
        "_relay",
        "_response_deadline",
        "_target",
        "_touch_at",
        "_unacked",
        "_up",
        "_upstream",
        "body_at",
        "body_done",
        "core",
        "ending",
        "ex",
        "over",
        "pending",
        "sid",
        "stalled_since",
        "trailers",
        "vm_id",
    )

    def __init__(self, core: H2Core, sid: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        self.core = core
        self.sid = sid
        self.pending = bytearray()  # answer bytes waiting for the client's window
        self.ending = False  # the answer is complete once `pending` is sent
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.stalled_since = 0.0
        self.body_done = ended
        self.vm_id: str | None = None
        self.over = False
        now = core.clock()
        self.body_at = now
        self._target = b""
        self._bad = ""
        self._fields = headers
        self._head: RequestHead | None = None
        # A bodiless request whose header list is the connection's kept one: admitted by `readmit`
        # in `start`, unread unless that verdict no longer holds.
        kept = core.admitter.kept_method(headers) if ended else None
        if kept is not None:
            self._method = kept
            self.ex = Exchange(kept, True, False, False, False)
        else:
            self._method = b""
            self._head = self._read(headers)
            self.ex = Exchange(self._method, True, not ended, not ended and self._head.content_length is None, False)
        self._upstream: UpstreamConn | None = None
        self._relay: H2cRelay | None = None  # the port speaks h2c: frames go through, not translated
        self._unacked = 0  # body bytes sent on to the guest while its write buffer was full: acked on resume
        self._parser: HttpResponseParser | None = None  # made on the answer's first bytes (none for a kept answer)
        self._headers: list[tuple[bytes, bytes]] = []  # of the answer, hop-by-hop ones left out
        self._answer_head: list[tuple[bytes, bytes]] = []  # the final answer's, without the edge's Set-Cookie
        self._framed = False  # the answer's head gave a content-length or chunked framing
        self._body: list[bytes] = []  # of the answer, within one read of the guest
        self._complete = False  # the guest's answer is whole
        self._final = False
        self._one_answer = True  # the guest's reads held one final answer, no more (else it is never kept)
        self._close_delimited = False  # the answer has neither content-length nor chunked framing
        self._paused_guest = False
        self._response_deadline = _INF
        self._up = 0
        self._down = 0
        self._touch_at = now + TOUCH_EVERY

    def _read(self, headers: list[tuple[bytes, bytes]]) -> RequestHead:
        head = RequestHead()
        authority = None
        for name, value in headers:
            if name[:1] == b":":
                if name == b":method":
                    self._method = value
                elif name == b":path":
                    self._target = value
                elif name == b":authority":
                    authority = value
            elif name != b"host" or authority is None:
                head.add(name, value)
        if authority is not None:
            head.add(b"host", authority)
        if not self.body_done and head.content_length is None:
            head.add(b"transfer-encoding", b"chunked")
        if not self._method or (not self._target and self._method != b"CONNECT"):
            self._bad = "a request needs :method and :path"
        return head

    # -- from the connection ------------------------------------------------------------------

    def start(self) -> None:
        """Admit the request; then a pooled guest connection, or reach one (waking the VM)."""
        ex = self.ex
        core = self.core
        h2c = False  # the admitted port speaks prior-knowledge HTTP/2: relayed as frames, not translated
        verdict = self._admit()
        if isinstance(verdict, Refusal):
            ex.refuse(verdict)
        else:
            ex.admit(verdict)
            h2c = verdict.h2c
        if ex.refusal is not None:
            self._answer(ex.refusal.status, ex.refusal.message, ex.refusal)
            return
        ctx = core.ctx
        vm_id = self.vm_id = ex.vm_id
        if vm_id is not None:
            ctx.backend.touch(vm_id)
            ctx.open_streams.opened(vm_id)
            if h2c:
                self._relay = H2cRelay(self, ex.head)
                guest = shared(vm_id, ex.port, ex.generation) if ex.vm_was_running else None
                if guest is not None:
                    ex.move(ExchangeState.FORWARDED)
                    self._attach_relay(guest)
                    return
                ex.move(ExchangeState.CONNECTING)
                core.io.reach(self)
                return
        if ex.vm_was_running:
            conn = ctx.pool.acquire(vm_id or CONTROL_KEY, ex.port, core.clock(), ex.generation)
            if conn is not None:
                self._attach(conn, reused=True)
                return
        ex.move(ExchangeState.CONNECTING)
        core.io.reach(self)

    def _admit(self) -> Admission | Refusal:
        """The verdict on the request: the kept one again for the kept header list while it holds
        (the token's life and the VM's record looked at again), else from its head."""
        admitter = self.core.admitter
        head = self._head
        try:
            if head is None:
                kept = admitter.readmit()
                if kept is not None:
                    return kept
                head = self._head = self._read(self._fields)
            if self._bad:
                return Refusal(400, self._bad)
            verdict = admitter.admit(self._method, self._target, "1.1", head, False)
        except Exception as exc:  # a bug in admission must still answer
            log.event("edge.admission_error", level="error", error=repr(exc), protocol="h2")
            return Refusal(400, "the request could not be admitted")
        if self.body_done and isinstance(verdict, Admission):
            admitter.tie(list(self._fields), verdict.head)  # a copy: the list is the session's
        return verdict

    def client_body(self, data: bytes, flow: int) -> None:
        """Request body bytes (`flow`: what they cost of the window, padding included)."""
        ex = self.ex
        self.body_at = self.core.clock()
        relay = self._relay
        if relay is not None:
            relay.client_body(data, flow)
            return
        self._up += len(data)
        framed: list[bytes] = [b"%x\r\n" % len(data), data, b"\r\n"] if ex.chunked and data else [data]
        upstream = self._upstream
        if upstream is not None:
            upstream.send_parts(framed)
            self._acked(flow)
        elif ex.body is not None:
            ex.body += framed
            ex.buffered += flow
        else:  # not wanted (answered already): the client may go on sending
            self.core.ack_body(self.sid, flow)

    def body_end(self) -> None:
        if self.body_done:
            return
        self.body_done = True
        ex = self.ex
        if not ex.end_body():
            return
        relay = self._relay
        if relay is not None:
            relay.body_end()
            if relay.upstream is not None and not relay.started:
                self._await_response(self.core.clock())
            return
        if ex.chunked:
            if self._upstream is not None:
                self._upstream.send(_LAST_CHUNK)
            elif ex.body is not None:
                ex.body.append(_LAST_CHUNK)
        if self._upstream is not None:
            self._await_response(self.core.clock())

    def client_reset(self) -> None:
        """The stream ended before its answer did (the client reset it, left, or a limit cut it)."""
        upstream = self._upstream
        self._upstream = None
        if upstream is not None:
            upstream.close()  # never pooled: the guest may still be answering
        if self._relay is not None:
            self._relay.close()
        self.core.io.cancel_reach(self)
        self._over()

    def answered(self) -> None:
        self._over()

    def window_opened(self) -> None:
        if self._relay is not None:
            self._relay.window_opened()
        if self._paused_guest:
            self._paused_guest = False
            if self._upstream is not None:
                self._upstream.resume_reading()

    def due(self, now: float) -> tuple[str, ErrorCodes] | None:
        """Why the stream must be reset now, if a deadline of it passed."""
        s = self.core.settings
        if self._body_expected() and now >= self.body_at + s.body_idle_timeout:
            return f"no request body bytes for {s.body_idle_timeout:g}s", ErrorCodes.CANCEL
        if self.stalled_since and now >= self.stalled_since + s.stall_timeout:
            return f"the client gave no window for {s.stall_timeout:g}s", ErrorCodes.CANCEL
        if now >= self._response_deadline and not self._final:
            self._response_deadline = _INF
            self._fail(504, f"{self.ex.where()} did not answer within {self.core.ctx.settings.read_timeout:g}s")
        return None

    def next_check(self) -> float:
        s = self.core.settings
        at = self._response_deadline
        if self._body_expected():
            at = min(at, self.body_at + s.body_idle_timeout)
        if self.stalled_since:
            at = min(at, self.stalled_since + s.stall_timeout)
        return at

    # -- from reaching (edge.reach.ReachEvents) ---------------------------------------------

    def waiting_for_vm(self, ex: Exchange) -> None:
        ex.move(ExchangeState.WAITING_FOR_VM)

    def vm_woken(self, ex: Exchange) -> None:
        ex.move(ExchangeState.CONNECTING)

    def upstream_opened(self, ex: Exchange, conn: UpstreamConn) -> None:
        if self.over:
            conn.close()
            return
        self._attach(conn, reused=False)

    def reach_refused(self, ex: Exchange, refusal: Refusal) -> None:
        self._answer(refusal.status, refusal.message, refusal)

    def reach_failed(self, ex: Exchange, status: int, message: str) -> None:
        self._fail(status, message)

    def reach_crashed(self, ex: Exchange, error: Exception) -> None:
        log.event("proxy.error", level="error", vm=ex.vm_id, error=repr(error), protocol="h2")
        self._answer(500, "the edge failed to handle this request")

    # -- from the guest connection (edge.upstream.Owner) -------------------------------------

    def upstream_data(self, data: bytes) -> None:
        self._down += len(data)
        parser = self._parser
        first = None  # the connection, when these are the answer's first bytes
        if parser is None:
            first = self._upstream
            assert first is not None  # data comes from the attached connection
            kept = first.answer
            if kept is not None and data == kept.data and self.body_done and not self.ex.is_head:
                self._again(first, kept)
                self._flowing()
                return
            parser = self._parser = HttpResponseParser(self)
        try:
            parser.feed_data(data)
        except HttpParserError as exc:
            self._body.clear()
            log.event("proxy.error", level="warning", vm=self.vm_id, error=f"invalid response: {exc}", protocol="h2")
            self._drop_upstream()
            self._fail(502, f"{self.ex.where()} sent an invalid HTTP response")
        else:
            body = self._send_body()
            if first is not None and self._complete:
                self._keep(first, data, body or b"")
        self._flowing()

    def upstream_lost(self, conn: UpstreamConn) -> None:
        if conn is not self._upstream:
            return
        self._upstream = None
        ex = self.ex
        if self.over:
            return
        if self._final and self._close_delimited:  # its end was the connection's end
            self.core.send_end(self.sid)
        elif self._final:  # the answer is cut short: the client must not take it for whole
            self.core.reset(self.sid, ErrorCodes.INTERNAL_ERROR, "upstream_lost")
        elif ex.retryable():
            ex.resent = True
            ex.body = []
            self._parser = None
            ex.move(ExchangeState.CONNECTING)
            self.core.io.reach(self)
        else:
            self._fail(502, f"{ex.where()} closed the connection without answering")

    def upstream_pause_writing(self) -> None:
        pass  # body bytes are acknowledged to the client only once the guest's buffer has room

    def upstream_resume_writing(self) -> None:
        n, self._unacked = self._unacked, 0
        self.core.ack_body(self.sid, n)

    # -- llhttp's callbacks on the answer ---------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in _HOP_BY_HOP:
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                self._framed = True
            return
        if name == b"content-length":
            self._framed = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # llhttp calls back from feed_data
        status = parser.get_status_code()
        out, self._headers = self._headers, []
        framed, self._framed = self._framed, False
        if status < 200:
            return  # interim answers (100 Continue) are the edge's business with the guest
        if self._final:  # another answer after the final one: the guest is out of step
            self._one_answer = False
        self._close_delimited = not framed and status not in (204, 304)
        self._answer_head = out
        head_only = self.ex.is_head  # the head is all of it, whatever its content-length says
        if head_only:
            self._drop_upstream()
        self._send_final_head(status, out, end=head_only)

    def on_body(self, data: bytes) -> None:
        self._body.append(data)

    def on_message_complete(self) -> None:
        if not self._final:
            return
        upstream = self._upstream
        self._upstream = None
        if upstream is not None:
            if self.body_done and self._parser is not None and self._parser.should_keep_alive():
                self.core.ctx.pool.release(upstream, self.core.clock())
            else:
                upstream.close()
        self._complete = True

    def _keep(self, conn: UpstreamConn, data: bytes, body: bytes) -> None:
        """`data`, the answer's first read, held all of it: kept on its connection when it is small,
        alone, and the connection went back to the pool (kept alive, the request whole)."""
        if self._one_answer and not conn.closed and len(data) <= REPEAT_MAX:
            conn.answer = KeptAnswer(data, self.ex.status, tuple(self._answer_head), body)

    def _again(self, conn: UpstreamConn, kept: KeptAnswer) -> None:
        """The connection's kept answer came again, byte for byte: what parsing it would do, unparsed
        (the stream's own Set-Cookie added)."""
        self._complete = True
        self._send_final_head(kept.status, kept.headers, end=False)
        core = self.core
        self._upstream = None
        core.ctx.pool.release(conn, core.clock())
        core.send_body(self.sid, kept.body, True)

    def _send_final_head(self, status: int, headers: Sequence[tuple[bytes, bytes]], end: bool) -> None:
        """The guest's final answer head goes to the client (parsed, kept or relayed from an h2c port):
        counted, the exchange streaming, the edge's own Set-Cookie added."""
        self._final = True
        self._response_deadline = _INF
        ex = self.ex
        ex.status = status
        if ex.cookie is not None:
            headers = [*headers, _cookie(ex.cookie)]
        self._count(status)
        if ex.state is ExchangeState.FORWARDED:
            ex.move(ExchangeState.STREAMING)
        self.core.send_head(self.sid, status, headers, end=end)

    def _send_body(self) -> bytes | None:
        """What one read of the guest gave of the answer's body goes on as one piece; a whole small
        answer as one DATA frame that also ends the stream. Returns what went."""
        body = self._body
        if not body and not self._complete:
            return None
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        if (
            self.core.send_body(self.sid, data, self._complete)
            and self._upstream is not None
            and not self._paused_guest
        ):
            self._paused_guest = True
            self._upstream.pause_reading()
        return data

    # -- inside ----------------------------------------------------------------------------

    def _attach(self, conn: UpstreamConn, reused: bool) -> None:
        ex = self.ex
        ex.move(ExchangeState.FORWARDED)
        ex.reused = reused
        if self._relay is not None:
            self._attach_relay(GuestH2c(conn, self.core.settings.stream_buffer))
            return
        self._upstream = conn
        conn.owner = self
        body = ex.body
        ex.body = None
        head = ex.head
        if body:
            conn.send_parts([head, *body])
        else:
            conn.send(head)
        self._up += len(head)
        buffered = ex.buffered
        if buffered:
            ex.buffered = 0
            self._acked(buffered)
        core = self.core
        now = self.body_at = core.clock()  # time held for a wake is not the client's
        if self.body_done:
            self._await_response(now)
        else:
            core.arm(self.next_check())

    def _attach_relay(self, guest: GuestH2c) -> None:
        relay = self._relay
        assert relay is not None
        self.ex.body = None
        relay.attach(guest)
        now = self.body_at = self.core.clock()
        if self.body_done and not relay.started:
            self._await_response(now)
        else:
            self.core.arm(self.next_check())

    def _body_expected(self) -> bool:
        """The client owes body bytes: not while they are held back by the edge (a wake, a full guest),
        nor once an h2c guest answered (a gRPC stream may be quiet either way for as long as it likes)."""
        relay = self._relay
        if relay is not None and (relay.started or relay.out):
            return False
        return not self.body_done and self.ex.body is None and not self._unacked

    def _acked(self, flow: int) -> None:
        upstream = self._upstream
        if upstream is not None and upstream.write_paused:
            self._unacked += flow
        else:
            self.core.ack_body(self.sid, flow)

    def _await_response(self, now: float) -> None:
        core = self.core
        at = self._response_deadline = now + core.ctx.settings.read_timeout
        core.arm(at)

    def _answer(self, status: int, message: str, refusal: Refusal | None = None) -> None:
        """The edge's own JSON answer (nothing of the guest's went out)."""
        self.core.io.cancel_reach(self)
        self._drop_upstream()
        if self._relay is not None:
            self._relay.close()
        doc = {"error": error_code(status)}
        if refusal is not None and refusal.reason is not None:
            doc["reason"] = refusal.reason
        doc["message"] = message
        payload = orjson.dumps(doc)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(payload)),
            (b"cache-control", b"no-store"),
        ]
        if refusal is not None and refusal.bearer:
            headers.append((b"www-authenticate", b"Bearer"))
        if refusal is not None and refusal.retry_after is not None:
            headers.append((b"retry-after", b"%d" % refusal.retry_after))
        self.ex.status = status
        self._final = True
        self._count(status)
        ex = self.ex
        if ex.state is not ExchangeState.REFUSED:
            ex.drop_body()
        core = self.core
        if ex.is_head:
            core.send_head(self.sid, status, headers, end=True)
            return
        core.send_head(self.sid, status, headers, end=False)
        core.send_body(self.sid, payload, end=True)

    def _fail(self, status: int, message: str) -> None:
        if self._final:
            self.core.reset(self.sid, ErrorCodes.INTERNAL_ERROR, "upstream_error")
            return
        log.event(
            "proxy.error",
            level="warning",
            vm=self.vm_id,
            port=self.ex.port,
            status=status,
            error=message,
            protocol="h2",
        )
        self._answer(status, message)

    # -- from an h2c guest (edge.h2c_relay.H2cRelay) -------------------------------------------

    def relay_head(self, status: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        self._send_final_head(status, headers, end)

    def relay_body(self, data: bytes) -> bool:
        """True while the client's buffer is full: the guest's bytes are then not acknowledged."""
        self._flowing()
        return self.core.send_body(self.sid, data)

    def relay_end(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        self.core.send_end(self.sid, trailers or None)

    def relay_reset(self, code: ErrorCodes, reason: str) -> None:
        self.core.reset(self.sid, code, reason)

    def relay_lost(self, code: ErrorCodes, what: str, started: bool) -> None:
        """The guest's connection ended the stream early; before any answer and unprocessed by
        the guest (REFUSED_STREAM): the client may safely retry it."""
        if self.over:
            return
        if started or code is ErrorCodes.REFUSED_STREAM:
            self.core.reset(self.sid, code, "upstream_lost")
        else:
            self._fail(502, f"{self.ex.where()} {what} without answering (an h2c port)")

    def moved(self, up: int, down: int) -> None:
        self._up += up
        self._down += down

    def _drop_upstream(self) -> None:
        upstream = self._upstream
        if upstream is not None:
            self._upstream = None
            upstream.close()

    def _count(self, status: int) -> None:
        self.core.ctx.metrics.request_h2(status)

    def _flowing(self) -> None:
        now = self.core.clock()
        if now >= self._touch_at and self.vm_id is not None:
            self._touch_at = now + TOUCH_EVERY
            self.core.ctx.backend.touch(self.vm_id)

    def _over(self) -> None:
        if self.over:
            return
        self.over = True
        self._parser = None  # it holds this stream's bound methods: no cycle left for the GC to find
        ctx = self.core.ctx
        if self.vm_id is not None:
            ctx.open_streams.closed(self.vm_id)
        ctx.metrics.proxied(self._up, self._down)
