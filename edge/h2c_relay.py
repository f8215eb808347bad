"""Client HTTP/2 streams relayed to a guest port that speaks prior-knowledge h2c (a gRPC server).

The request head comes from admission (the same HTTP/1.1 head an HTTP/1.1 port would get: token
stripped, X-Forwarded-* set, X-Mvm-Port out) and goes out as HTTP/2 HEADERS on a guest connection
shared by the streams to that port (`GuestH2c`, one per VM port and generation while it has room;
closed after `IDLE_CLOSE` seconds without a stream), with python-hyper's h2 as the client side.
Frames go through as they are: DATA both ways, trailers (grpc-status, grpc-message) from the
guest, RST_STREAM either way. Flow control is carried through: a client's body bytes are
acknowledged to it only once the guest's window took them, and the guest's only while the client's
window keeps up (`stream_buffer`). A request is never sent twice: once its HEADERS went out, a lost
connection ends the stream.
"""

from __future__ import annotations

import asyncio
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

from .hpack_native import use_native_hpack
from .upstream import UpstreamConn

if TYPE_CHECKING:
    from .h2_stream import H2Stream

IDLE_CLOSE = 30.0  # a guest connection without a stream this long is closed
_CONN_WINDOW = 16 * 1024 * 1024  # the guest connection's receive window: one stalled stream cannot starve the rest
_shared: dict[tuple[str, int], list[GuestH2c]] = {}  # open guest connections by (VM, port)


def shared(vm_id: str, port: int, generation: int) -> GuestH2c | None:
    """An open guest connection to the port, in the VM's generation, with room for a stream."""
    for guest in _shared.get((vm_id, port), ()):
        if guest.usable(generation):
            return guest
    return None
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


class GuestH2c:
    """One h2c connection to a guest port and the streams it carries (guest stream id -> relay)."""

    def __init__(self, upstream: UpstreamConn, window: int) -> None:
        self.upstream: UpstreamConn | None = upstream
        upstream.owner = self
        self.key = upstream.key
        self.generation = upstream.generation
        self.relays: dict[int, H2cRelay] = {}
        self.going_away = False
        self._idle: asyncio.TimerHandle | None = None
        conn = self.conn = use_native_hpack(H2Connection(H2Configuration(client_side=True, header_encoding=None)))
        conn.initiate_connection()
        conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window, SettingCodes.ENABLE_PUSH: 0})
        conn.increment_flow_control_window(_CONN_WINDOW - 65535)
        _shared.setdefault(self.key, []).append(self)

    def usable(self, generation: int) -> bool:
        upstream = self.upstream
        return (
            upstream is not None
            and not upstream.closed
            and not upstream.stale
            and not self.going_away
            and self.generation == generation
            and len(self.relays) < self.conn.remote_settings.max_concurrent_streams
        )

    def open(self, relay: H2cRelay, headers: list[tuple[bytes, bytes]], end: bool) -> int:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        sid = self.conn.get_next_available_stream_id()
        self.relays[sid] = relay
        self.conn.send_headers(sid, headers, end_stream=end)
        return sid

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.upstream is not None:
            self.upstream.send(data)

    def stream_done(self, sid: int) -> None:
        if self.relays.pop(sid, None) is not None and not self.relays:
            if self.going_away:
                self.close()
            elif self.upstream is not None:
                self._idle = asyncio.get_running_loop().call_later(IDLE_CLOSE, self._idle_close)

    def close(self) -> None:
        self._forget()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()  # the transport writes out what is queued before it closes

    # -- edge.upstream.Owner -------------------------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except H2Error as exc:
            log.event("proxy.error", level="warning", vm=self.key[0], error=f"h2c guest: {exc!r}", protocol="h2c")
            self._lose_all(ErrorCodes.PROTOCOL_ERROR, "sent an invalid HTTP/2 frame")
            self.close()
            return
        for event in events:
            if isinstance(event, ConnectionTerminated):
                self.going_away = True
                self._forget()
                last = event.last_stream_id if event.last_stream_id is not None else 0
                for sid, relay in list(self.relays.items()):
                    if sid > last:
                        self.relays.pop(sid, None)
                        relay.lost(ErrorCodes.REFUSED_STREAM, "went away")
                continue
            sid = getattr(event, "stream_id", 0)
            target = self.relays.get(sid) if sid else None
            if target is not None:
                target.event(event)
            elif isinstance(event, DataReceived):  # for a stream the client ended: the window stays open
                with contextlib.suppress(H2Error):
                    self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, WindowUpdated) and not sid:
                for each in list(self.relays.values()):
                    each.send_body()
        self.flush()
        if self.going_away and not self.relays:
            self.close()

    def upstream_lost(self, conn: UpstreamConn) -> None:
        if conn is self.upstream:
            self.upstream = None
            self._lose_all(ErrorCodes.INTERNAL_ERROR, "closed the connection")
            self._forget()

    def upstream_pause_writing(self) -> None:
        pass  # body bytes wait in each relay's queue, unacknowledged to the client, until the socket drains

    def upstream_resume_writing(self) -> None:
        for relay in list(self.relays.values()):
            relay.send_body()

    def _lose_all(self, code: ErrorCodes, what: str) -> None:
        relays, self.relays = self.relays, {}
        for relay in relays.values():
            relay.lost(code, what)

    def _idle_close(self) -> None:
        self._idle = None
        if not self.relays:
            self.close()

    def _forget(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        peers = _shared.get(self.key)
        if peers is not None and self in peers:
            peers.remove(self)
            if not peers:
                del _shared[self.key]


class H2cRelay:
    """The guest side of one client stream: its stream on a shared guest connection, and the windows."""

    def __init__(self, stream: H2Stream, head: bytes) -> None:
        self.stream = stream
        self.headers = request_headers(head)
        self.guest: GuestH2c | None = None
        self.sid = 0
        self.out: deque[tuple[bytes, int]] = deque()  # client body bytes (and their flow) not yet sent on
        self.ending = False  # the client's END_STREAM is to follow `out`
        self.started = False  # the guest's response head went to the client
        self.done = False  # the guest ended the stream (or reset it), or it was lost
        self._down_unacked = 0  # guest bytes held while the client's buffer is full: acked when it drains

    @property
    def upstream(self) -> GuestH2c | None:
        return self.guest

    # -- from the client stream ---------------------------------------------------------------

    def attach(self, guest: GuestH2c) -> None:
        """Send the request's HEADERS (and what body came) on the guest connection."""
        self.guest = guest
        end = self.ending and not self.out
        if end:
            self.ending = False
        self.sid = guest.open(self, self.headers, end)
        self.send_body()

    def client_body(self, data: bytes, flow: int) -> None:
        self.out.append((data, flow))
        if self.guest is not None:
            self.send_body()

    def body_end(self) -> None:
        self.ending = True
        if self.guest is not None:
            self.send_body()

    def window_opened(self) -> None:
        """The client's buffer drained below `stream_buffer`: the guest may send as much again."""
        n, self._down_unacked = self._down_unacked, 0
        guest = self.guest
        if n and guest is not None and not self.done:
            with contextlib.suppress(H2Error):
                guest.conn.acknowledge_received_data(n, self.sid)
            guest.flush()

    def close(self) -> None:
        """The client's stream ended first (reset, deadline, gone): RST_STREAM CANCEL to the guest."""
        guest, self.guest = self.guest, None
        if guest is None:
            return
        if not self.done:
            self.done = True
            with contextlib.suppress(H2Error):
                guest.conn.reset_stream(self.sid, ErrorCodes.CANCEL)
            guest.flush()
        guest.stream_done(self.sid)

    # -- from the guest connection -------------------------------------------------------------

    def event(self, event: object) -> None:
        stream = self.stream
        guest = self.guest
        if guest is None or self.done:
            return
        if isinstance(event, ResponseReceived):
            status, headers = response_headers(list(event.headers or ()))
            self.started = True
            ended = event.stream_ended is not None
            if ended:
                self._over()
            stream.relay_head(status, headers, ended)
        elif isinstance(event, DataReceived):
            stream.moved(0, len(event.data))
            if stream.relay_body(event.data):
                self._down_unacked += event.flow_controlled_length
            else:
                with contextlib.suppress(H2Error):
                    guest.conn.acknowledge_received_data(event.flow_controlled_length, self.sid)
        elif isinstance(event, TrailersReceived):
            self._over()
            _, trailers = response_headers(list(event.headers or ()))
            stream.relay_end(trailers)
        elif isinstance(event, StreamEnded):
            self._over()
            stream.relay_end(None)
        elif isinstance(event, StreamReset):
            self._over()
            stream.relay_reset(ErrorCodes(event.error_code), "upstream_reset")
        elif isinstance(event, WindowUpdated):
            self.send_body()

    def lost(self, code: ErrorCodes, what: str) -> None:
        """The guest connection ended (or refused) this stream before it was over."""
        if self.done:
            return
        self.done = True
        self.guest = None
        self.stream.relay_lost(code, what, self.started)

    def send_body(self) -> None:
        """Send what the guest's window and socket take of the queued body; acknowledge that to the client."""
        guest = self.guest
        if guest is None or self.done or guest.upstream is None:
            return
        upstream = guest.upstream
        conn = guest.conn
        out = self.out
        acked = 0
        try:
            while out and not upstream.write_paused:
                data, flow = out[0]
                n = min(len(data), conn.local_flow_control_window(self.sid), conn.max_outbound_frame_size)
                if n <= 0 and data:
                    break
                conn.send_data(self.sid, data[:n])
                if n == len(data):
                    out.popleft()
                    acked += flow
                else:
                    out[0] = (data[n:], flow - n)
                    acked += n
            if self.ending and not out:
                self.ending = False
                conn.end_stream(self.sid)
        except H2Error:  # the guest closed its side meanwhile: the rest of the body is not wanted
            out.clear()
        guest.flush()
        if acked:
            self.stream.moved(acked, 0)
            self.stream.core.ack_body(self.stream.sid, acked)

    def _over(self) -> None:
        """The guest's side of the stream is over; the connection goes on for other streams."""
        self.done = True
        guest, self.guest = self.guest, None
        if guest is not None:
            guest.flush()
            guest.stream_done(self.sid)
