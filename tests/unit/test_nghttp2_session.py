"""libnghttp2's server session through ctypes (edge.nghttp2_session), against python-hyper's h2 as
the client: a request is one event, body bytes are acknowledged only when consumed, answers go
within the client's window, and protocol errors, bad headers and the header list limit end what
they must."""

from __future__ import annotations

from collections.abc import Sequence

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes
from hpack import Encoder, NeverIndexedHeaderTuple
from hyperframe.frame import HeadersFrame, SettingsFrame

from edge.h2_guard import PREFACE
from edge.nghttp2_session import (
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

GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/x"), (b":authority", b"vm.example")]
POST = [(b":method", b"POST"), *GET[1:]]
OK = [(b":status", b"200"), (b"content-type", b"text/plain")]


class Answers:
    """An answer source: bytes waiting per stream, whether they are all, trailers; None defers."""

    def __init__(self) -> None:
        self.pending: dict[int, bytearray] = {}
        self.ending: set[int] = set()
        self.trailers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.asked: list[tuple[int, int]] = []

    def take(self, sid: int, n: int) -> tuple[bytes, bool, Sequence[tuple[bytes, bytes]] | None] | None:
        self.asked.append((sid, n))
        pending = self.pending.setdefault(sid, bytearray())
        if not pending and sid not in self.ending:
            return None
        data = bytes(pending[:n])
        del pending[:n]
        last = not pending and sid in self.ending
        return data, last, self.trailers.get(sid) if last else None


def _pair(
    client_settings: dict[int, int] | None = None, limit: int = 65536, window: int = 1 << 20
) -> tuple[H2Connection, ServerSession, Answers]:
    config = H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
    )  # so that the client sends bad headers as given
    client = H2Connection(config)
    client.initiate_connection()
    if client_settings:
        client.update_settings(client_settings)
    answers = Answers()
    server = ServerSession(answers, limit)
    settings = [
        (SETTINGS_INITIAL_WINDOW_SIZE, 16384),
        (SETTINGS_MAX_HEADER_LIST_SIZE, limit),
        (SETTINGS_MAX_FRAME_SIZE, 16384),
        (SETTINGS_ENABLE_PUSH, 0),
    ]
    client.receive_data(server.start(settings, 4, window - 65535))
    _exchange(client, server)
    return client, server, answers


def _exchange(client: H2Connection, server: ServerSession) -> list[Event]:
    """The client's bytes to the server, the server's answer back; the client's events."""
    server.receive(client.data_to_send())
    return client.receive_data(server.send())


def _events(server: ServerSession) -> list[tuple]:
    events, server.events = server.events, []
    return events


def test_the_settings_advertise_the_limits_and_the_connection_window() -> None:
    client, _server, _ = _pair()
    remote = client.remote_settings
    assert remote[SettingCodes.MAX_CONCURRENT_STREAMS] == 4  # advertised; libnghttp2 itself is given 8
    assert remote[SettingCodes.INITIAL_WINDOW_SIZE] == 16384
    assert remote[SettingCodes.MAX_HEADER_LIST_SIZE] == 65536
    assert remote[SettingCodes.ENABLE_PUSH] == 0
    assert client.outbound_flow_control_window == 1 << 20


def test_streams_past_the_advertised_limit_reach_the_edge_up_to_twice_it() -> None:
    """The edge refuses streams past the advertised limit itself (REFUSED_STREAM, a stream error);
    libnghttp2 ends the connection only past twice the limit."""
    server = ServerSession(Answers(), 65536)
    server.start([], 4, 0)
    encoder = Encoder()
    opened = [HeadersFrame(sid, encoder.encode(GET), flags=["END_HEADERS"]) for sid in range(1, 19, 2)]
    frames = [SettingsFrame(0), SettingsFrame(0, flags=["ACK"]), *opened[:8]]  # our SETTINGS acknowledged
    server.receive(PREFACE + b"".join(f.serialize() for f in frames))
    assert [e[1] for e in _events(server) if e[0] == REQUEST] == list(range(1, 17, 2))
    server.send()
    assert server.want_read()
    server.receive(opened[8].serialize())
    assert goaway_in(server.send()) is not None and not server.want_read()
    server.close()


def test_a_request_is_one_event_with_all_its_fields_and_the_answer_ends_with_its_data() -> None:
    client, server, answers = _pair()
    client.send_headers(1, [*GET, (b"user-agent", b"t")], end_stream=True)
    server.receive(client.data_to_send())
    assert _events(server) == [(REQUEST, 1, [*GET, (b"user-agent", b"t")], True)]
    answers.pending[1] = bytearray(b"hello")
    answers.ending.add(1)
    server.respond(1, [*OK, NeverIndexedHeaderTuple(b"set-cookie", b"t=1")], end=False)
    events = client.receive_data(server.send())
    head = next(e for e in events if isinstance(e, ResponseReceived))
    assert head.headers == [*OK, (b"set-cookie", b"t=1")]
    assert type(head.headers[-1]) is NeverIndexedHeaderTuple, "the edge's cookie stays out of HPACK's table"
    data = next(e for e in events if isinstance(e, DataReceived))
    assert data.data == b"hello" and data.stream_ended is not None
    assert _events(server) == [(CLOSED, 1, 0)]


def test_body_bytes_are_acknowledged_only_once_consumed() -> None:
    client, server, _ = _pair()
    client.send_headers(1, POST)
    client.send_data(1, b"x" * 16384)
    server.receive(client.data_to_send())
    events = _events(server)
    assert events[0] == (REQUEST, 1, POST, False)
    assert sum(len(e[2]) for e in events if e[0] == DATA) == 16384
    assert client.local_flow_control_window(1) == 0
    assert server.send() == b"", "no WINDOW_UPDATE before the bytes went on"
    server.consume(1, 16384)
    client.receive_data(server.send())
    assert client.local_flow_control_window(1) == 16384
    client.end_stream(1)
    server.receive(client.data_to_send())
    assert _events(server) == [(END, 1)]


def test_answer_bytes_go_within_the_clients_window_and_a_deferred_stream_resumes() -> None:
    client, server, answers = _pair(client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 100})
    client.send_headers(1, GET, end_stream=True)
    _exchange(client, server)
    server.respond(1, OK, end=False)
    client.receive_data(server.send())
    assert answers.asked == [(1, 100)]  # nothing waited: the stream is deferred
    answers.pending[1] = bytearray(b"a" * 250)
    answers.ending.add(1)
    server.resume(1)
    events = client.receive_data(server.send())
    assert sum(len(e.data) for e in events if isinstance(e, DataReceived)) == 100
    assert server.send() == b"", "the window is spent"
    client.acknowledge_received_data(100, 1)
    client.increment_flow_control_window(1000, 1)
    events = _exchange(client, server)
    assert sum(len(e.data) for e in events if isinstance(e, DataReceived)) == 150
    assert any(isinstance(e, StreamEnded) for e in events)


def test_trailers_end_the_answer() -> None:
    client, server, answers = _pair()
    client.send_headers(1, GET, end_stream=True)
    _exchange(client, server)
    answers.pending[1] = bytearray(b"body")
    answers.ending.add(1)
    answers.trailers[1] = [(b"grpc-status", b"0")]
    server.respond(1, OK, end=False)
    events = client.receive_data(server.send())
    trailers = next(e for e in events if isinstance(e, TrailersReceived))
    assert trailers.headers == [(b"grpc-status", b"0")]
    assert any(isinstance(e, StreamEnded) for e in events)


def test_a_client_reset_and_a_server_reset() -> None:
    client, server, _ = _pair()
    client.send_headers(1, POST)
    client.send_headers(3, POST)
    _exchange(client, server)
    _events(server)
    client.reset_stream(1, ErrorCodes.CANCEL)
    server.receive(client.data_to_send())
    assert _events(server) == [(RESET, 1), (CLOSED, 1, ErrorCodes.CANCEL)]
    server.reset(3, ErrorCodes.REFUSED_STREAM)
    events = client.receive_data(server.send())
    assert [(e.stream_id, e.error_code) for e in events if isinstance(e, StreamReset)] == [
        (3, ErrorCodes.REFUSED_STREAM)
    ]


def test_a_client_goaway_is_an_event() -> None:
    client, server, _ = _pair()
    client.close_connection()
    server.receive(client.data_to_send())
    assert _events(server) == [(GOAWAY, 0)]


def test_a_malformed_preface_is_a_fatal_error() -> None:
    server = ServerSession(Answers(), 65536)
    assert server.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") < 0
    assert "magic" in server.error
    server.close()


def test_a_bad_header_resets_its_stream_and_the_connection_goes_on() -> None:
    client, server, _ = _pair()
    client.send_headers(1, [*GET, (b"Upper", b"case")], end_stream=True)  # RFC 9113 8.2.1: names are lowercase
    server.receive(client.data_to_send())
    assert [e for e in _events(server) if e[0] == REQUEST] == []
    events = client.receive_data(server.send())
    assert [(e.stream_id, e.error_code) for e in events if isinstance(e, StreamReset)] == [
        (1, ErrorCodes.PROTOCOL_ERROR)
    ]
    client.send_headers(3, [*GET, (b"connection", b"close")], end_stream=True)  # connection-specific (8.2.2)
    client.send_headers(5, [*GET, (b"x-a", b"1\r\nx-b: 2")], end_stream=True)  # CR LF in a value (8.2.1)
    client.send_headers(7, [*GET, (b"x a", b"1")], end_stream=True)  # a space in a name, which
    client.send_headers(9, GET, end_stream=True)  # libnghttp2 alone would drop and let the request through
    server.receive(client.data_to_send())
    assert [e[1] for e in _events(server) if e[0] == REQUEST] == [9]
    resets = [e for e in client.receive_data(server.send()) if isinstance(e, StreamReset)]
    assert [(e.stream_id, e.error_code) for e in resets] == [(sid, ErrorCodes.PROTOCOL_ERROR) for sid in (3, 5, 7)]
    client.send_headers(11, [*GET, (b"x-n", b"a\x00b")], end_stream=True)  # NUL in a value (fields come NUL-ended)
    server.receive(client.data_to_send())
    assert [e for e in _events(server) if e[0] == REQUEST] == []
    resets = [e for e in client.receive_data(server.send()) if isinstance(e, StreamReset)]
    assert [(e.stream_id, e.error_code) for e in resets] == [(11, ErrorCodes.PROTOCOL_ERROR)]
    assert server.want_read()


def test_answer_heads_too_big_for_the_packed_buffers_arrive_whole() -> None:
    """Answer heads are packed into buffers made once (64 fields, 16 KiB); a bigger one takes arrays of
    its own, and each arrives as given, never-indexed fields included, one after the other."""
    client, server, answers = _pair()
    heads = [
        [*OK, *[(b"x-%d" % i, b"v%d" % i) for i in range(70)]],
        [*OK, (b"x-big", b"b" * 20000), NeverIndexedHeaderTuple(b"set-cookie", b"t=2")],
        [*OK, NeverIndexedHeaderTuple(b"set-cookie", b"t=3")],
    ]
    for n, head in enumerate(heads):
        sid = 2 * n + 1
        client.send_headers(sid, GET, end_stream=True)
        server.receive(client.data_to_send())
        answers.ending.add(sid)
        server.respond(sid, head, end=False)
        got = next(e for e in client.receive_data(server.send()) if isinstance(e, ResponseReceived))
        assert got.headers == head
        assert [type(f) is NeverIndexedHeaderTuple for f in got.headers] == [type(f) is not tuple for f in head]


def test_the_header_list_limit_stops_reading_at_once() -> None:
    client, server, _ = _pair(limit=8192)
    client.send_headers(1, [*GET, *[(b"x-big", b"b" * 4000)] * 3], end_stream=True)
    wire = client.data_to_send()
    assert 0 <= server.receive(wire) < len(wire)
    assert _events(server) == [(OVERSIZED, 1)]


def test_a_protocol_error_ends_the_session_with_libnghttp2s_goaway() -> None:
    client, server, _ = _pair()
    client.send_headers(1, GET, end_stream=True)
    wire = client.data_to_send() + b"\x00\x00\x04\x00\x01\x00\x00\x00\x01late"  # DATA on a half-closed stream
    server.receive(wire)
    assert server.want_read()
    out = server.send()
    assert not server.want_read()
    code, debug = goaway_in(out) or (None, b"")
    assert code == ErrorCodes.STREAM_CLOSED and b"half-closed" in debug
    assert any(isinstance(e, ConnectionTerminated) for e in client.receive_data(out))


def test_one_field_past_64_kib_is_libnghttp2s_compression_error_whatever_the_limit() -> None:
    client, server, _ = _pair(limit=1 << 20)
    client.send_headers(1, [*GET, (b"x-big", b"b" * 100_000)], end_stream=True)  # 75,000 bytes Huffman-coded
    server.receive(client.data_to_send())
    assert _events(server) == []
    code, _ = goaway_in(server.send()) or (None, b"")
    assert code == ErrorCodes.COMPRESSION_ERROR and not server.want_read()


def test_request_trailers_end_its_body() -> None:
    client, server, _ = _pair()
    client.send_headers(1, POST)
    client.send_data(1, b"part")
    client.send_headers(1, [(b"x-checksum", b"1")], end_stream=True)
    server.receive(client.data_to_send())
    assert _events(server) == [(REQUEST, 1, POST, False), (DATA, 1, b"part"), (END, 1)]
