"""One client HTTP/2 stream relayed to a guest port that speaks prior-knowledge h2c (a gRPC server).

The request head comes from admission (the same HTTP/1.1 head an HTTP/1.1 port would get: token
stripped, X-Forwarded-* set, X-Mvm-Port out) and goes out as HTTP/2 HEADERS on a connection of its
own, with python-hyper's h2 as the client side. Frames go through as they are: DATA both ways,
trailers (grpc-status, grpc-message) from the guest, RST_STREAM either way. Flow control is carried
through: a client's body bytes are acknowledged to it only once the guest's window took them, and
the guest's are acknowledged only while the client's window keeps up (`stream_buffer`). A request
is never sent twice: once its HEADERS went out, a lost connection ends the stream.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import TYPE_CHECKING

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes

from vmm.jsonlog import log

from .upstream import UpstreamConn

if TYPE_CHECKING:
    from .h2_stream import H2Stream

SID = 1  # the one stream on the guest connection
_NOT_FORWARDED = frozenset(
    (
        b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te", b"host",
        b"http2-settings",
    )
)  # fmt: skip


def request_headers(head: bytes) -> list[tuple[bytes, bytes]]:
    """An admitted HTTP/1.1 request head as HTTP/2 headers for the guest (`te: trailers`, which gRPC
    servers require, is always sent: it is the only value HTTP/2 allows)."""
    lines = head.split(b"\r\n")
    method, target, _ = lines[0].split(b" ", 2)
    authority = b""
    rest: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if not line:
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"host":
            authority = value.strip()
        elif name not in _NOT_FORWARDED:
            rest.append((name, value.strip()))
    return [
        (b":method", method),
        (b":scheme", b"http"),
        (b":path", target),
        (b":authority", authority),
        *rest,
        (b"te", b"trailers"),
    ]


def response_headers(headers: list[tuple[bytes, bytes]]) -> tuple[int, list[tuple[bytes, bytes]]]:
    """The guest's :status and its other headers, pseudo-headers and connection-specific ones out."""
    status = 502
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name == b":status":
            status = int(value)
        elif name[:1] != b":" and name not in _NOT_FORWARDED:
            out.append((name, value))
    return status, out


class H2cRelay:
    """The guest side of one stream: an h2 client connection carrying it, and the windows both ways."""

    def __init__(self, stream: H2Stream, head: bytes, window: int) -> None:
        self.stream = stream
        self.headers = request_headers(head)
        self.window = window
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.upstream: UpstreamConn | None = None
        self.out: deque[tuple[bytes, int]] = deque()  # client body bytes (and their flow) not yet sent on
        self.ending = False  # the client's END_STREAM is to follow `out`
        self.started = False  # the guest's response head went to the client
        self.done = False  # the guest ended the stream (or reset it)
        self._down_unacked = 0  # guest bytes held while the client's buffer is full: acked when it drains

    # -- from the client stream ---------------------------------------------------------------

    def attach(self, upstream: UpstreamConn) -> None:
        """The guest connection is open: preface, SETTINGS, the request's HEADERS and what body came."""
        self.upstream = upstream
        upstream.owner = self
        conn = self.conn
        conn.initiate_connection()
        conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: self.window, SettingCodes.ENABLE_PUSH: 0})
        if self.window > 65535:
            conn.increment_flow_control_window(self.window - 65535)
        conn.send_headers(SID, self.headers, end_stream=self.ending and not self.out)
        if self.ending and not self.out:
            self.ending = False
        self._send_body()

    def client_body(self, data: bytes, flow: int) -> None:
        self.out.append((data, flow))
        if self.upstream is not None:
            self._send_body()

    def body_end(self) -> None:
        self.ending = True
        if self.upstream is not None:
            self._send_body()

    def window_opened(self) -> None:
        """The client's buffer drained below `stream_buffer`: the guest may send as much again."""
        n, self._down_unacked = self._down_unacked, 0
        if n and self.upstream is not None:
            self._ack_guest(n)
            self._flush()

    def close(self) -> None:
        """The client's stream ended first (reset, deadline, gone): RST_STREAM CANCEL to the guest."""
        upstream, self.upstream = self.upstream, None
        if upstream is None:
            return
        if not self.done:
            self.done = True
            with contextlib.suppress(H2Error):
                self.conn.reset_stream(SID, ErrorCodes.CANCEL)
            data = self.conn.data_to_send()
            if data:
                upstream.send(data)
        upstream.close()  # the transport writes out what is queued before it closes

    # -- from the guest connection (edge.upstream.Owner) ----------------------------------------

    def upstream_data(self, data: bytes) -> None:
        stream = self.stream
        stream.moved(0, len(data))
        try:
            events = self.conn.receive_data(data)
        except H2Error as exc:
            log.event("proxy.error", level="warning", vm=stream.vm_id, error=f"h2c guest: {exc!r}", protocol="h2c")
            self._lost(ErrorCodes.PROTOCOL_ERROR, "sent an invalid HTTP/2 frame")
            return
        for event in events:
            if self.upstream is None or self.done:
                break
            if isinstance(event, ResponseReceived):
                status, headers = response_headers(list(event.headers or ()))
                self.started = True
                ended = event.stream_ended is not None
                if ended:
                    self.done = True
                stream.relay_head(status, headers, ended)
            elif isinstance(event, DataReceived):
                if stream.relay_body(event.data):
                    self._down_unacked += event.flow_controlled_length
                else:
                    self._ack_guest(event.flow_controlled_length)
            elif isinstance(event, TrailersReceived):
                self.done = True
                _, trailers = response_headers(list(event.headers or ()))
                stream.relay_end(trailers)
            elif isinstance(event, StreamEnded):
                self.done = True
                stream.relay_end(None)
            elif isinstance(event, StreamReset):
                self.done = True
                stream.relay_reset(ErrorCodes(event.error_code), "upstream_reset")
            elif isinstance(event, WindowUpdated):
                self._send_body()
            elif isinstance(event, ConnectionTerminated):
                unprocessed = event.last_stream_id is not None and event.last_stream_id < SID
                self._lost(ErrorCodes.REFUSED_STREAM if unprocessed else ErrorCodes.INTERNAL_ERROR, "went away")
                return
        if self.done:
            self._finish()
        else:
            self._flush()

    def upstream_lost(self, conn: UpstreamConn) -> None:
        if conn is self.upstream:
            self.upstream = None
            if not self.done:
                self._lost(ErrorCodes.INTERNAL_ERROR, "closed the connection")

    def upstream_pause_writing(self) -> None:
        pass  # body bytes wait in `out`, unacknowledged to the client, until the socket drains

    def upstream_resume_writing(self) -> None:
        self._send_body()

    # -- inside --------------------------------------------------------------------------------

    def _send_body(self) -> None:
        """Send what the guest's window and socket take of the queued body; acknowledge that to the client."""
        upstream = self.upstream
        if upstream is None or self.done:
            return
        conn = self.conn
        out = self.out
        acked = 0
        try:
            while out and not upstream.write_paused:
                data, flow = out[0]
                n = min(len(data), conn.local_flow_control_window(SID), conn.max_outbound_frame_size)
                if n <= 0 and data:
                    break
                conn.send_data(SID, data[:n])
                if n == len(data):
                    out.popleft()
                    acked += flow
                else:
                    out[0] = (data[n:], flow - n)
                    acked += n
                self._flush()
            if self.ending and not out:
                self.ending = False
                conn.end_stream(SID)
        except H2Error:  # the guest closed its side meanwhile: the rest of the body is not wanted
            out.clear()
        self._flush()
        if acked:
            self.stream.moved(acked, 0)
            self.stream.core.ack_body(self.stream.sid, acked)

    def _ack_guest(self, n: int) -> None:
        with contextlib.suppress(H2Error):
            self.conn.acknowledge_received_data(n, SID)

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.upstream is not None:
            self.upstream.send(data)

    def _finish(self) -> None:
        """The guest's side of the stream is over: its connection is not reused (one stream each)."""
        self._flush()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()

    def _lost(self, code: ErrorCodes, what: str) -> None:
        self.done = True
        self._finish()
        self.stream.relay_lost(code, what, self.started)
