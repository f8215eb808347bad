"""The h2c relay: header translation both ways, and streams relayed over a shared guest connection
(the guest is h2's server side, fed what the edge sent)."""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, RequestReceived, StreamEnded, StreamReset

from edge import h2c_relay
from edge.h2c_relay import GuestH2c, H2cRelay, request_headers, response_headers, shared


def test_an_admitted_head_becomes_h2_headers_without_connection_headers() -> None:
    head = (
        b"POST /mvm.Demo/Echo HTTP/1.1\r\nHost: vm.example\r\nConnection: keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Type: application/grpc\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n"
    )
    assert request_headers(head) == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/mvm.Demo/Echo"),
        (b":authority", b"vm.example"),
        (b"content-type", b"application/grpc"),
        (b"x-forwarded-for", b"127.0.0.1"),
        (b"te", b"trailers"),
    ]


def test_the_guest_status_and_headers_come_back_without_pseudo_headers() -> None:
    status, headers = response_headers(
        [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"connection", b"close"),
         (b"grpc-status", b"7"), (b"grpc-message", b"no")]
    )  # fmt: skip
    assert status == 200
    assert headers == [(b"content-type", b"application/grpc"), (b"grpc-status", b"7"), (b"grpc-message", b"no")]


# -- the relay against a guest made of h2's server side -------------------------------------------

HEAD = b"POST /mvm.Demo/Echo HTTP/1.1\r\nHost: vm\r\nContent-Type: application/grpc\r\n\r\n"


class FakeUpstream:
    def __init__(self) -> None:
        self.key = ("vm1", 50051)
        self.generation = 1
        self.owner: object = None
        self.closed = self.stale = self.write_paused = False
        self.sent = bytearray()

    def send(self, data: bytes) -> None:
        self.sent += data

    def close(self) -> None:
        self.closed = True


class FakeCore:
    def __init__(self) -> None:
        self.acked = 0

    def ack_body(self, sid: int, n: int) -> None:
        self.acked += n


class FakeStream:
    """What a relay reports to its client stream (edge.h2_stream.H2Stream's relay_* calls)."""

    def __init__(self) -> None:
        self.core = FakeCore()
        self.sid = 1
        self.log: list[tuple[object, ...]] = []

    def relay_head(self, status: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        self.log.append(("head", status, end))

    def relay_body(self, data: bytes) -> bool:
        self.log.append(("body", data))
        return False

    def relay_end(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        self.log.append(("end", trailers))

    def relay_reset(self, code: ErrorCodes, reason: str) -> None:
        self.log.append(("reset", code))

    def relay_lost(self, code: ErrorCodes, what: str, started: bool) -> None:
        self.log.append(("lost", code, started))

    def moved(self, up: int, down: int) -> None:
        pass


class Guest:
    """The guest's end: h2's server side, fed what the edge sent."""

    def __init__(self, up: FakeUpstream) -> None:
        self.up = up
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.conn.initiate_connection()

    def read(self) -> list[object]:
        data, self.up.sent = bytes(self.up.sent), bytearray()
        return list(self.conn.receive_data(data))

    def write(self, guest: GuestH2c) -> None:
        guest.upstream_data(self.conn.data_to_send())


def _relay(stream: FakeStream) -> H2cRelay:
    return H2cRelay(stream, HEAD)  # type: ignore[arg-type]


def _pair() -> tuple[FakeUpstream, GuestH2c, Guest]:
    h2c_relay._shared.clear()
    up = FakeUpstream()
    guest = GuestH2c(up, 65535)  # type: ignore[arg-type]
    return up, guest, Guest(up)


async def test_streams_share_one_guest_connection_and_trailers_come_back() -> None:
    up, guest, peer = _pair()
    a, b = FakeStream(), FakeStream()
    ra, rb = _relay(a), _relay(b)
    ra.body_end()
    ra.attach(guest)
    assert shared("vm1", 50051, 1) is guest and shared("vm1", 50051, 2) is None
    rb.attach(shared("vm1", 50051, 1))  # type: ignore[arg-type]
    rb.client_body(b"\x00\x00\x00\x00\x02{}", 7)
    rb.body_end()
    requests = [e for e in peer.read() if isinstance(e, RequestReceived)]
    assert [e.stream_id for e in requests] == [1, 3]
    assert (b"te", b"trailers") in requests[0].headers
    assert b.core.acked == 7  # the body went on to the guest: the client may send as much again
    peer.conn.send_headers(3, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    peer.conn.send_data(3, b"\x00\x00\x00\x00\x02{}")
    peer.conn.send_headers(3, [(b"grpc-status", b"0")], end_stream=True)
    peer.write(guest)
    assert b.log == [("head", 200, False), ("body", b"\x00\x00\x00\x00\x02{}"), ("end", [(b"grpc-status", b"0")])]
    assert set(guest.relays) == {1} and not up.closed


async def test_a_client_cancel_is_a_reset_to_the_guest_and_the_connection_goes_on() -> None:
    up, guest, peer = _pair()
    stream = FakeStream()
    relay = _relay(stream)
    relay.attach(guest)
    peer.read()
    relay.close()
    resets = [e for e in peer.read() if isinstance(e, StreamReset)]
    assert [(e.stream_id, e.error_code) for e in resets] == [(1, ErrorCodes.CANCEL)]
    assert not up.closed and shared("vm1", 50051, 1) is guest


async def test_a_guest_reset_reaches_the_client_and_goaway_refuses_unprocessed_streams() -> None:
    up, guest, peer = _pair()
    first, second = FakeStream(), FakeStream()
    _relay(first).attach(guest)
    _relay(second).attach(guest)
    peer.read()
    peer.conn.reset_stream(1, ErrorCodes.CANCEL)
    peer.write(guest)
    assert first.log == [("reset", ErrorCodes.CANCEL)]
    peer.conn.close_connection(last_stream_id=1)
    peer.write(guest)
    assert second.log == [("lost", ErrorCodes.REFUSED_STREAM, False)]  # never processed: safe to retry
    assert up.closed and shared("vm1", 50051, 1) is None


async def test_body_past_the_guest_window_waits_unacknowledged() -> None:
    _, guest, peer = _pair()
    stream = FakeStream()
    relay = _relay(stream)
    relay.attach(guest)
    for _ in range(5):
        relay.client_body(b"x" * 16384, 16384)
    got = sum(len(e.data) for e in peer.read() if isinstance(e, DataReceived))
    assert got == 65535 and stream.core.acked < 5 * 16384
    peer.conn.increment_flow_control_window(65536)
    peer.conn.increment_flow_control_window(65536, stream_id=1)
    peer.write(guest)
    relay.body_end()
    events = peer.read()
    assert got + sum(len(e.data) for e in events if isinstance(e, DataReceived)) == 5 * 16384
    assert any(isinstance(e, StreamEnded) for e in events) and stream.core.acked == 5 * 16384
