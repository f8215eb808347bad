"""One client's HTTP/2 connection with no I/O of its own (sans-IO), around libnghttp2's session.

libnghttp2 (`edge.nghttp2_session`, its nghttp2_session through ctypes) keeps the protocol's
state machine (frames, HPACK, stream states, flow-control windows, RFC 9113 §8.2's header
checks); this core decides what the edge does with it: each request becomes an
`edge.h2_stream.H2Stream` (admitted, woken, relayed like an HTTP/1.1 one), answer bytes wait per
stream for the client's window (bounded: past `stream_buffer` the guest is read no further),
request body bytes are acknowledged to the client only once they went on to the guest, and the
[http2] limits end a stream (RST_STREAM) or the connection (GOAWAY). Events come in as method
calls, actions go out through `H2Io`; time comes from the clock it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from h2.errors import ErrorCodes

from vmm.jsonlog import log

from .admission import Admitter
from .h2_guard import FrameGuard, Verdict
from .h2_settings import Http2Settings
from .h2_stream import H2Stream
from .nghttp2_session import (
    CLOSED,
    DATA,
    END,
    GOAWAY,
    OVERSIZED,
    REQUEST,
    RESET,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_FRAME_SIZE,
    SETTINGS_MAX_HEADER_LIST_SIZE,
    ServerSession,
    goaway_in,
)
from .proxy_context import ClientConnection, ProxyContext

_INF = float("inf")
_CLOSE_GRACE = 30.0  # a closed connection whose peer stops reading is aborted after this
_DEFAULT_WINDOW = 65535  # a connection's receive window before any WINDOW_UPDATE (RFC 9113 §6.9.2)


class H2Io(ClientConnection, Protocol):
    """The actions the core asks of its adapter (edge.h2_conn.H2Protocol)."""

    def send_client(self, data: bytes) -> object: ...
    def close_client(self) -> None: ...
    def half_close_client(self) -> None:
        """Send the end (FIN) after what was written, and keep reading."""

    def abort_client(self) -> None: ...
    def set_timer(self, at: float) -> None: ...
    def cancel_timer(self) -> None: ...
    def flush_soon(self) -> None:
        """Call the core's `flush_now` once, after the callbacks of this turn of the loop."""

    def reach(self, stream: H2Stream) -> None:
        """Start reaching the stream's upstream (edge.reach, a task); its outcome goes to `stream`."""

    def cancel_reach(self, stream: H2Stream) -> None:
        """Stop reaching for `stream` (it ended); no outcome comes."""


def _local_settings(s: Http2Settings) -> list[tuple[int, int]]:
    """What the edge's SETTINGS say besides max_concurrent_streams (ServerSession.start adds it)."""
    return [
        (SETTINGS_INITIAL_WINDOW_SIZE, s.stream_window),
        (SETTINGS_MAX_HEADER_LIST_SIZE, s.max_header_list_size),
        (SETTINGS_MAX_FRAME_SIZE, s.max_frame_size),
        (SETTINGS_ENABLE_PUSH, 0),
    ]


class H2Core:
    """Routes, authorises and relays the streams of one HTTP/2 client connection."""

    def __init__(self, ctx: ProxyContext, proto: bytes, io: H2Io, clock: Callable[[], float]) -> None:
        self.ctx = ctx
        self.settings = s = ctx.settings.http2
        self.proto = proto
        self.io = io
        self.clock = clock
        self.session = ServerSession(self, s.max_header_list_size)
        self.guard = FrameGuard(s, clock)
        self.streams: dict[int, H2Stream] = {}
        self.client = b"unknown"
        self.admitter: Admitter
        self.write_paused = False
        self.closed = False
        self.draining = False
        self.can_half_close = False  # the transport has a FIN of its own to send (TLS has not)
        self._lingering = False
        self._counted = False
        self._timer_at = _INF
        self._idle_since = 0.0
        self._flush_queued = False
        self._streams_delta = 0  # streams opened less closed since the gauge last moved
        self._deferred: set[int] = set()  # streams whose answer libnghttp2 waits for (`take` had none)
        self._sent: list[int] = []  # streams whose answer `take` gave out whole: finished once it is written
        self._drained: list[H2Stream] = []  # streams whose buffer `take` brought back under `stream_buffer`
        self._waiting: set[int] = set()  # streams that may have answer bytes left after the next write
        self._last_write = b""  # what libnghttp2 gave to write last (its own GOAWAY, when it ended)

    # -- events from the client --------------------------------------------------------------

    def connected(self, client: bytes, can_half_close: bool = False) -> None:
        self.client = client
        self.can_half_close = can_half_close
        ctx = self.ctx
        self.admitter = Admitter(
            ctx.backend,
            ctx.router,
            ctx.tokens,
            client,
            self.proto,
            ctx.control_auth,
            trusted=ctx.settings.trusts(client),
        )
        ctx.connection_made(self.io)
        if self.closed:  # drained as it arrived
            return
        s = self.settings
        self.io.send_client(
            self.session.start(_local_settings(s), s.max_concurrent_streams, s.connection_window - _DEFAULT_WINDOW)
        )
        if not ctx.client_opened(client):
            ctx.metrics.connection_refused("per_ip")
            self._goaway(Verdict(ErrorCodes.ENHANCE_YOUR_CALM, "per_ip", "too many connections from this address"))
            return
        self._counted = True
        self._idle_since = self.clock()
        self.arm(self._idle_since + s.idle_timeout)

    def client_data(self, data: bytes) -> None:
        if self.closed:
            return
        verdict = self.guard.feed(data)
        if verdict is not None:
            self._goaway(verdict)
            return
        session = self.session
        taken = session.receive(data)
        events = session.events
        if events:
            session.events = []
            self._walk(events)
        if self.closed:
            return
        if taken < 0:
            self._goaway(Verdict(ErrorCodes.PROTOCOL_ERROR, "protocol_error", f"libnghttp2: {session.error}"))
            return
        self.flush()

    def _walk(self, events: list[tuple]) -> None:
        """What libnghttp2 found in the client's bytes, in order."""
        streams = self.streams
        for event in events:
            if self.closed:
                return
            kind = event[0]
            if kind == REQUEST:
                self._request(event[1], event[2], event[3])
            elif kind == DATA:
                sid, data = event[1], event[2]
                stream = streams.get(sid)
                if stream is None:
                    self.session.consume(sid, len(data))
                else:
                    stream.client_body(data, len(data))
            elif kind == END:
                stream = streams.get(event[1])
                if stream is not None:
                    stream.body_end()
            elif kind == CLOSED:
                self._closed(event[1], "protocol_error")
            elif kind == RESET:
                self._closed(event[1], "client")
            elif kind == OVERSIZED:
                limit = self.settings.max_header_list_size
                self._goaway(Verdict(ErrorCodes.ENHANCE_YOUR_CALM, "protocol_error",
                                     f"a header list larger than {limit} has been received"))  # fmt: skip
            elif kind == GOAWAY:
                self._end()

    def client_lost(self) -> None:
        self.closed = True
        gone = list(self.streams.values())
        self.streams.clear()
        for stream in gone:
            stream.client_reset()
        self._streams_delta -= len(gone)
        self._move_streams_gauge()
        if self._counted:
            self._counted = False
            self.ctx.client_closed(self.client)
        self.ctx.connection_lost(self.io)
        self._timer_at = _INF
        self.io.cancel_timer()
        self.session.close()

    def client_write_paused(self) -> None:
        self.write_paused = True

    def client_write_resumed(self) -> None:
        self.write_paused = False
        if self.closed:
            return
        for sid in self._deferred:
            self.session.resume(sid)
        self._deferred.clear()
        self.flush()

    def drain(self) -> None:
        """The edge is stopping: GOAWAY now (streams open so far are answered), close when they are."""
        if self.closed or self.draining:
            return
        self.draining = True
        session = self.session
        session.goaway(ErrorCodes.NO_ERROR, session.last_stream())  # later streams are ignored
        self.ctx.metrics.h2_goaway("drain")
        self.flush_now()
        if not self.streams:
            self._end()

    def timer_fired(self) -> None:
        self._timer_at = _INF
        if self.closed:
            if self._lingering:
                self._lingering = False
                self.io.close_client()
                self.arm(self.clock() + _CLOSE_GRACE)
            else:
                self.io.abort_client()
            return
        now = self.clock()
        s = self.settings
        if not self.streams:
            if now >= self._idle_since + s.idle_timeout:
                self._goaway(Verdict(ErrorCodes.NO_ERROR, "idle", "the connection was idle"))
            else:
                self.arm(self._idle_since + s.idle_timeout)
            return
        next_at = _INF
        for sid, stream in list(self.streams.items()):
            due = stream.due(now)
            if due is not None:
                why, code = due
                log.event(
                    "proxy.h2_stream_reset",
                    level="info",
                    vm=stream.vm_id,
                    client=self.client.decode("ascii", "replace"),
                    why=why,
                    protocol="h2",
                )
                self.reset(sid, code, why)
                continue
            next_at = min(next_at, stream.next_check())
        self.flush()
        if next_at < _INF:
            self.arm(next_at)

    # -- what streams ask for ----------------------------------------------------------------

    def send_head(self, sid: int, status: int, headers: Sequence[tuple[bytes, bytes]], end: bool) -> None:
        if self.closed or sid not in self.streams:
            return
        self.session.respond(sid, [(b":status", b"%d" % status), *headers], end)
        if end:
            self._sent.append(sid)  # finished once its HEADERS are written
        self.flush()

    def send_body(self, sid: int, data: bytes, end: bool = False) -> bool:
        """Queue answer bytes (`end`: the last of them, which then carry END_STREAM); True while the
        stream's buffer is past `stream_buffer` (stop reading the guest)."""
        stream = self.streams.get(sid)
        if stream is None or self.closed:
            return False
        stream.pending += data
        stream.ending = stream.ending or end
        self._more(sid)
        return len(stream.pending) > self.settings.stream_buffer

    def send_end(self, sid: int, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        stream = self.streams.get(sid)
        if stream is None or self.closed:
            return
        stream.ending = True
        stream.trailers = trailers
        self._more(sid)

    def ack_body(self, sid: int, n: int) -> None:
        """`n` request body bytes went on to the guest: the client may send as many more."""
        if n and not self.closed:
            self.session.consume(sid, n)
            self.flush()

    def reset(self, sid: int, code: ErrorCodes, reason: str) -> None:
        """End one stream (the connection goes on)."""
        stream = self.streams.pop(sid, None)
        if stream is not None:
            stream.client_reset()
            self._stream_gone()
        if self.closed:
            return
        self.ctx.metrics.h2_reset(reason)
        self._deferred.discard(sid)
        self.session.reset(sid, code)  # libnghttp2 drops it if the stream closed already
        self.flush()

    def take(self, sid: int, n: int) -> tuple[bytes, bool, Sequence[tuple[bytes, bytes]] | None] | None:
        """libnghttp2 asks for up to `n` answer bytes of a stream, as the client's windows allow
        (edge.nghttp2_session.AnswerSource); None defers the stream until `_more`."""
        stream = self.streams.get(sid)
        if stream is None:  # reset meanwhile: its DATA is dropped with it
            return b"", True, None
        pending = stream.pending
        if self.write_paused or not (pending or stream.ending):
            self._deferred.add(sid)
            return None
        if len(pending) <= n:
            data = bytes(pending)
            pending.clear()
        else:
            data = bytes(pending[:n])
            del pending[:n]
            self._waiting.add(sid)
        stream.stalled_since = 0.0
        if len(pending) <= self.settings.stream_buffer:
            self._drained.append(stream)
        if pending or not stream.ending:
            return data, False, None
        self._sent.append(sid)
        return data, True, stream.trailers

    def flush(self) -> None:
        """Send what libnghttp2 queued, once this turn of the loop is over: the answers of all
        streams that finished meanwhile go out in one write (one TLS record, one system call)."""
        if not self._flush_queued:
            self._flush_queued = True
            self.io.flush_soon()

    def flush_now(self) -> None:
        if self.closed:
            self._flush_queued = False
            return  # `_end` sent what there was before it closed
        self._write()
        self._flush_queued = False
        self._move_streams_gauge()
        if self._waiting:
            self._time_stalls()
        if not self.closed and not self.draining and not self.session.want_read():
            self._ended_by_library()

    def _ended_by_library(self) -> None:
        """libnghttp2 ended the connection itself (a protocol error): its GOAWAY, the last frame it
        wrote, says why."""
        code, debug = goaway_in(self._last_write) or (ErrorCodes.PROTOCOL_ERROR, b"")
        why = debug.decode("utf-8", "replace") or self.session.error or "a protocol error"
        self._goaway(Verdict(ErrorCodes(code), "protocol_error", f"libnghttp2: {why}"), sent=True)

    # -- inside -------------------------------------------------------------------------------

    def _write(self) -> None:
        """Write what libnghttp2 has, then finish the streams whose answers went out whole (which
        may queue more: an RST_STREAM for a body no longer wanted) and walk the events sending
        brought (streams closed), until nothing is left."""
        session = self.session
        while True:
            data = session.send()
            if data:
                self._last_write = data
                self.io.send_client(data)
            sent, drained, events = self._sent, self._drained, session.events
            if not sent and not drained and not events:
                return
            self._sent, self._drained = [], []
            for stream in drained:
                stream.window_opened()
            for sid in sent:
                self._finished(sid)
            if events:  # streams closed as their last frames went (or reset by libnghttp2)
                session.events = []
                self._walk(events)

    def _more(self, sid: int) -> None:
        """A stream has answer bytes (or its end) for libnghttp2 to take at the next write."""
        if sid in self._deferred and not self.write_paused:
            self._deferred.discard(sid)
            self.session.resume(sid)
        self._waiting.add(sid)
        self.flush()

    def _time_stalls(self) -> None:
        """Streams with answer bytes left after a write wait for the client's window: time it."""
        now = self.clock()
        streams = self.streams
        for sid in self._waiting:
            stream = streams.get(sid)
            if stream is None:
                continue
            if stream.pending and not self.write_paused:
                if not stream.stalled_since:
                    stream.stalled_since = now
                    self.arm(now + self.settings.stall_timeout)
            else:
                stream.stalled_since = 0.0
        self._waiting.clear()

    def _request(self, sid: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        if len(self.streams) >= self.settings.max_concurrent_streams:
            self.reset(sid, ErrorCodes.REFUSED_STREAM, "max_concurrent_streams")
            return
        stream = H2Stream(self, sid, headers, ended)
        self.streams[sid] = stream
        self._set_streams_gauge(1)
        stream.start()
        self.arm(stream.next_check())

    def _closed(self, sid: int, why: str) -> None:
        """libnghttp2 closed a stream the edge still serves: the client reset it, or it broke the
        protocol on it (libnghttp2 reset it)."""
        stream = self.streams.pop(sid, None)
        if stream is not None:
            self.ctx.metrics.h2_reset(why)
            self._deferred.discard(sid)
            stream.client_reset()
            self._stream_gone()

    def _finished(self, sid: int) -> None:
        """The answer went out whole; the stream is done once its request is read (or dropped)."""
        stream = self.streams.pop(sid, None)
        if stream is None:
            return
        stream.answered()
        self._stream_gone()
        if not stream.body_done:  # the rest of the body is not wanted
            self.session.reset(sid, ErrorCodes.NO_ERROR)

    def _stream_gone(self) -> None:
        self._set_streams_gauge(-1)
        if not self.streams:
            self._idle_since = self.clock()
            if self.draining:
                self._end()
            else:
                self.arm(self._idle_since + self.settings.idle_timeout)

    def _set_streams_gauge(self, delta: int) -> None:
        """Count streams opened and closed; the gauge moves by their sum at the next flush (a stream
        answered within one turn of the loop costs it nothing)."""
        self._streams_delta += delta
        self.flush()

    def _move_streams_gauge(self) -> None:
        if self._streams_delta:
            self.ctx.metrics.h2_streams(self._streams_delta)
            self._streams_delta = 0

    def _goaway(self, verdict: Verdict, sent: bool = False) -> None:
        """End the connection: GOAWAY with the verdict's code (libnghttp2 made it already when `sent`)."""
        if self.closed:
            return
        log.event(
            "proxy.h2_goaway", level="info", client=self.client.decode("ascii", "replace"), reason=verdict.reason,
            code=verdict.code.name, error=verdict.message, protocol="h2",
        )  # fmt: skip
        self.ctx.metrics.h2_goaway(verdict.reason)
        if not sent:
            session = self.session
            session.goaway(verdict.code, session.last_stream(), verdict.message.encode()[:256])
        self._end()

    def _end(self) -> None:
        """Flush what is queued (a GOAWAY, mostly) and close; streams still open are cut."""
        if self.closed:
            return
        if self.draining and not self.streams:
            self.session.terminate(ErrorCodes.NO_ERROR)
        self.closed = True  # from here on, what streams ask for is dropped
        self._write()
        self._flush_queued = False
        for stream in list(self.streams.values()):
            stream.client_reset()
        self._streams_delta -= len(self.streams)
        self.streams.clear()
        self._move_streams_gauge()
        self._timer_at = _INF
        if self.can_half_close:
            # A client still sending would get a TCP reset on close, which can discard the GOAWAY
            # before it is read: FIN first, read off what comes for linger_timeout, then close.
            self._lingering = True
            self.io.half_close_client()
            self.arm(self.clock() + self.ctx.settings.linger_timeout)
        else:
            self.io.close_client()
            self.arm(self.clock() + _CLOSE_GRACE)  # a peer that stops reading is aborted then

    def arm(self, when: float) -> None:
        if when < self._timer_at:
            self._timer_at = when
            self.io.set_timer(when)
