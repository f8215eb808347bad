"""One client's HTTP/2 connection with no I/O of its own (sans-IO), around python-hyper's h2.

h2 keeps the protocol's state machine (frames, HPACK, stream states, flow-control windows);
this core decides what the edge does with it: each request becomes an `edge.h2_stream.H2Stream`
(admitted, woken, relayed like an HTTP/1.1 one), answer bytes wait per stream for the client's
window (bounded: past `stream_buffer` the guest is read no further), request body bytes are
acknowledged to the client only once they went on to the guest, and the [http2] limits end a
stream (RST_STREAM) or the connection (GOAWAY). Events come in as method calls, actions go out
through `H2Io`; time comes from the clock it is given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes, Settings
from hpack.exceptions import HPACKError
from hyperframe.frame import GoAwayFrame

from vmm.jsonlog import log

from .admission import Admitter
from .h2_guard import FrameGuard, Verdict
from .h2_settings import Http2Settings
from .hpack_native import use_native_hpack
from .proxy_context import ClientConnection, ProxyContext

if TYPE_CHECKING:
    from .h2_stream import H2Stream

_INF = float("inf")
_MAX_STREAM_ID = 2**31 - 1
_CLOSE_GRACE = 30.0  # a closed connection whose peer stops reading is aborted after this


# What clients send is validated as h2 does by default (RFC 9113 §8.2: illegal characters, pseudo-
# headers, connection-specific headers; cookies joined). What the edge sends is not checked again:
# it builds those headers itself (names lowercased, hop-by-hop ones dropped, values as llhttp or
# the guest connection's own h2 validated them), and h2's outbound checks were a tenth of its CPU.
SERVER_CONFIG = H2Configuration(
    client_side=False, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
)


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


def _local_settings(s: Http2Settings, max_streams: int) -> Settings:
    return Settings(
        client=False,
        initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: s.stream_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
            SettingCodes.MAX_FRAME_SIZE: s.max_frame_size,
            SettingCodes.ENABLE_PUSH: 0,
        },
    )


class H2Core:
    """Routes, authorises and relays the streams of one HTTP/2 client connection."""

    def __init__(self, ctx: ProxyContext, proto: bytes, io: H2Io, clock: Callable[[], float]) -> None:
        self.ctx = ctx
        self.settings = s = ctx.settings.http2
        self.proto = proto
        self.io = io
        self.clock = clock
        self.conn = use_native_hpack(H2Connection(SERVER_CONFIG))
        self.guard = FrameGuard(s, clock)
        self.streams: dict[int, H2Stream] = {}
        self.client = b"unknown"
        self.admitter: Admitter
        self.write_paused = False
        self.closed = False
        self.draining = False
        self.can_half_close = False  # the transport has a FIN of its own to send (TLS has not)
        self._lingering = False
        self._last_stream = _MAX_STREAM_ID  # after a drain's GOAWAY: streams above are refused
        self._counted = False
        self._timer_at = _INF
        self._idle_since = 0.0
        self._flush_queued = False
        self._streams_delta = 0  # streams opened less closed since the gauge last moved

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
        conn = self.conn
        conn.local_settings = _local_settings(s, s.max_concurrent_streams)
        conn.max_inbound_frame_size = s.max_frame_size
        conn.decoder.max_header_list_size = s.max_header_list_size
        conn.initiate_connection()
        # The advertised limit is this edge's to enforce (REFUSED_STREAM, a stream error: a client
        # may open streams before it has read our SETTINGS), so h2's own check, a connection
        # error, is given a margin past it.
        conn.local_settings = _local_settings(s, 2 * s.max_concurrent_streams)
        if s.connection_window > 65535:
            conn.increment_flow_control_window(s.connection_window - 65535)
        if not ctx.client_opened(client):
            ctx.metrics.connection_refused("per_ip")
            self._goaway(Verdict(ErrorCodes.ENHANCE_YOUR_CALM, "per_ip", "too many connections from this address"))
            return
        self._counted = True
        self._idle_since = self.clock()
        self.arm(self._idle_since + s.idle_timeout)
        self.flush_now()

    def client_data(self, data: bytes) -> None:
        if self.closed:
            return
        verdict = self.guard.feed(data)
        if verdict is not None:
            self._goaway(verdict)
            return
        try:
            events = self.conn.receive_data(data)
        except (ProtocolError, HPACKError) as exc:
            code = getattr(exc, "error_code", ErrorCodes.PROTOCOL_ERROR) or ErrorCodes.PROTOCOL_ERROR
            self._goaway(Verdict(ErrorCodes(code), "protocol_error", str(exc) or type(exc).__name__), sent=True)
            return
        for event in events:
            if self.closed:
                return
            if isinstance(event, DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is None:
                    self._ack(event.stream_id, event.flow_controlled_length)
                else:
                    stream.client_body(event.data, event.flow_controlled_length)
                if event.stream_ended is not None and stream is not None:
                    stream.body_end()
            elif isinstance(event, RequestReceived):
                self._request(event)
            elif isinstance(event, StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None and not stream.body_done:
                    stream.body_end()
            elif isinstance(event, WindowUpdated):
                self._window_opened(event.stream_id)
            elif isinstance(event, StreamReset):
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    self.ctx.metrics.h2_reset("client")
                    stream.client_reset()
                    self._stream_gone()
            elif isinstance(event, TrailersReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.body_end()
            elif isinstance(event, ConnectionTerminated):
                self._end()
                return
        self.flush()

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

    def client_write_paused(self) -> None:
        self.write_paused = True

    def client_write_resumed(self) -> None:
        self.write_paused = False
        for sid in list(self.streams):
            self._pump(sid)
        self.flush()

    def drain(self) -> None:
        """The edge is stopping: GOAWAY now (streams open so far are answered), close when they are."""
        if self.closed or self.draining:
            return
        self.draining = True
        self._last_stream = self.conn.highest_inbound_stream_id
        frame = GoAwayFrame(0)
        frame.last_stream_id = self._last_stream
        frame.error_code = ErrorCodes.NO_ERROR
        self.flush_now()
        self.io.send_client(frame.serialize())
        self.ctx.metrics.h2_goaway("drain")
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

    def send_head(self, sid: int, status: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        if self.closed or sid not in self.streams:
            return
        self.conn.send_headers(sid, [(b":status", b"%d" % status), *headers], end_stream=end)
        if end:
            self._finished(sid)
        self.flush()

    def send_body(self, sid: int, data: bytes, end: bool = False) -> bool:
        """Queue answer bytes (`end`: the last of them, which then carry END_STREAM); True while the
        stream's buffer is past `stream_buffer` (stop reading the guest)."""
        stream = self.streams.get(sid)
        if stream is None or self.closed:
            return False
        stream.pending += data
        stream.ending = stream.ending or end
        self._pump(sid)
        self.flush()
        return len(stream.pending) > self.settings.stream_buffer

    def send_end(self, sid: int, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        stream = self.streams.get(sid)
        if stream is None or self.closed:
            return
        stream.ending = True
        stream.trailers = trailers
        self._pump(sid)
        self.flush()

    def ack_body(self, sid: int, n: int) -> None:
        """`n` request body bytes went on to the guest: the client may send as many more."""
        if n and not self.closed:
            self._ack(sid, n)
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
        with contextlib.suppress(H2Error):  # the stream may have closed on h2's side already
            self.conn.reset_stream(sid, code)
        self.flush()

    def flush(self) -> None:
        """Send what h2 queued, once this turn of the loop is over: the answers of all streams that
        finished meanwhile go out in one write (one TLS record, one system call), not one per frame."""
        if not self._flush_queued:
            self._flush_queued = True
            self.io.flush_soon()

    def flush_now(self) -> None:
        self._flush_queued = False
        self._move_streams_gauge()
        if self.closed:
            return  # `_end` sent what there was before it closed
        data = self.conn.data_to_send()
        if data:
            self.io.send_client(data)

    # -- inside -------------------------------------------------------------------------------

    def _request(self, event: RequestReceived) -> None:
        from .h2_stream import H2Stream  # the stream module needs this one's types

        sid = event.stream_id
        if self.draining and sid > self._last_stream:
            self.reset(sid, ErrorCodes.REFUSED_STREAM, "drain")
            return
        if len(self.streams) >= self.settings.max_concurrent_streams:
            self.reset(sid, ErrorCodes.REFUSED_STREAM, "max_concurrent_streams")
            return
        ended = event.stream_ended is not None
        stream = H2Stream(self, sid, list(event.headers or ()), ended)
        self.streams[sid] = stream
        self._set_streams_gauge(1)
        stream.start()
        self.arm(stream.next_check())

    def _pump(self, sid: int) -> None:
        """Send what the client's window allows of a stream's queued answer."""
        stream = self.streams.get(sid)
        if stream is None:
            return
        conn = self.conn
        pending = stream.pending
        while pending and not self.write_paused:
            window = conn.local_flow_control_window(sid)
            if window <= 0:
                break
            n = min(len(pending), window, conn.max_outbound_frame_size)
            if n == len(pending):
                last = stream.ending and not stream.trailers  # the last DATA frame ends the stream itself
                conn.send_data(sid, bytes(pending), end_stream=last)
                pending.clear()
                if last:
                    self._finished(sid)
                    return
                break
            conn.send_data(sid, bytes(pending[:n]))
            del pending[:n]
        now = self.clock()
        if pending and not self.write_paused:
            if not stream.stalled_since:
                stream.stalled_since = now
                self.arm(now + self.settings.stall_timeout)
        else:
            stream.stalled_since = 0.0
        if len(pending) <= self.settings.stream_buffer:
            stream.window_opened()
        if not pending and stream.ending:
            if stream.trailers:
                conn.send_headers(sid, stream.trailers, end_stream=True)
            else:
                conn.end_stream(sid)
            self._finished(sid)

    def _window_opened(self, sid: int) -> None:
        if sid:
            self._pump(sid)
        else:
            for each in list(self.streams):
                self._pump(each)

    def _finished(self, sid: int) -> None:
        """The answer went out whole; the stream is done once its request is read (or dropped)."""
        stream = self.streams.pop(sid, None)
        if stream is None:
            return
        stream.answered()
        self._stream_gone()
        if not stream.body_done:  # the rest of the body is not wanted
            with contextlib.suppress(H2Error):
                self.conn.reset_stream(sid, ErrorCodes.NO_ERROR)

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

    def _ack(self, sid: int, n: int) -> None:
        with contextlib.suppress(H2Error):  # a stream closed meanwhile: h2 opened the connection's window
            self.conn.acknowledge_received_data(n, sid)

    def _goaway(self, verdict: Verdict, sent: bool = False) -> None:
        """End the connection: GOAWAY with the verdict's code (h2 made it already when `sent`)."""
        if self.closed:
            return
        log.event(
            "proxy.h2_goaway", level="info", client=self.client.decode("ascii", "replace"), reason=verdict.reason,
            code=verdict.code.name, error=verdict.message, protocol="h2",
        )  # fmt: skip
        self.ctx.metrics.h2_goaway(verdict.reason)
        if not sent:
            with contextlib.suppress(H2Error):
                self.conn.close_connection(verdict.code, additional_data=verdict.message.encode()[:256])
        self._end()

    def _end(self) -> None:
        """Flush what is queued (a GOAWAY, mostly) and close; streams still open are cut."""
        if self.closed:
            return
        if self.draining and not self.streams:
            with contextlib.suppress(H2Error):
                self.conn.close_connection(ErrorCodes.NO_ERROR)
        self.flush_now()
        self.closed = True
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
