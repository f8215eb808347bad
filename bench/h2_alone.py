"""The CPU the edge's HTTP/2 session alone spends per request: no sockets, no TLS, no streams' own work.

`python -m bench.h2_alone [--requests N]`. A client connection (python-hyper's h2) sends requests
with the headers h2load sends through the edge (its Bearer token never indexed by HPACK, as nghttp2
sends it); the server session takes them in and answers each with the headers an nginx upstream
gives and a 100-byte body, `streams` at a time (h2load's -m). Only the server side's calls are
timed (process CPU time), split into taking a request in (frames, HPACK, header checks, stream
state, the events handed to Python) and sending its answer out. The server is the edge's:
libnghttp2's nghttp2_session through ctypes (`edge.nghttp2_session`), with the token in the
Authorization header and in a cookie (which HPACK indexes after the first request); beside it,
what the edge used before, python-hyper's h2 with libnghttp2's HPACK (`edge.hpack_native`) and
the configuration the edge gave it. Set against the edge's CPU per request under h2load
(bench.h2_bench), it is the session's share of it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, RequestReceived

from edge.h2_settings import Http2Settings
from edge.hpack_native import use_native_hpack
from edge.nghttp2_session import REQUEST, SETTINGS_INITIAL_WINDOW_SIZE, ServerSession
from edge.settings import token_service
from mvm.config import load_config

from .stats import median, table

BODY = b"a" * 100
_RESPONSE = [
    (b":status", b"200"),
    (b"server", b"nginx/1.26.3"),
    (b"date", b"Fri, 04 Dec 2026 16:00:00 GMT"),
    (b"content-type", b"text/plain"),
    (b"content-length", b"%d" % len(BODY)),
]
# The edge's h2 configuration before libnghttp2's session: inbound headers checked, outbound not.
_H2_CONFIG = H2Configuration(
    client_side=False, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
)


def request_headers(token: str) -> list[tuple[bytes, bytes]]:
    """What h2load sends per request through the edge (bench.h2_bench's -H arguments)."""
    return [
        (b":scheme", b"https"),
        (b":authority", b"benchvm1.mvm.localhost"),
        (b":method", b"GET"),
        (b":path", b"/"),
        (b"user-agent", b"h2load nghttp2/1.64.0"),
        (b"authorization", f"Bearer {token}".encode()),
    ]


def _client() -> H2Connection:
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    return client


class _Answers:
    """The answer source of the bench's session: each stream's 100-byte body, whole, at once."""

    def __init__(self) -> None:
        self.waiting: dict[int, bytes] = {}

    def take(self, sid: int, n: int) -> tuple[bytes, bool, Sequence[tuple[bytes, bytes]] | None] | None:
        return self.waiting.pop(sid), True, None


def _native_server(client: H2Connection) -> Callable[[bytes], tuple[bytes, int, int]]:
    """The edge's session; its turn: (what it writes, ns in, ns out) for the client's bytes."""
    s = Http2Settings()
    answers = _Answers()
    session = ServerSession(answers, s.max_header_list_size)
    client.receive_data(session.start([(SETTINGS_INITIAL_WINDOW_SIZE, s.stream_window)], 128, 0))

    def turn(wire: bytes) -> tuple[bytes, int, int]:
        began = time.process_time_ns()
        session.receive(wire)
        events, session.events = session.events, []
        requests = [event[1] for event in events if event[0] == REQUEST]
        middle = time.process_time_ns()
        for sid in requests:
            answers.waiting[sid] = BODY
            session.respond(sid, _RESPONSE, False)
        answer = session.send()
        return answer, middle - began, time.process_time_ns() - middle

    return turn


def _h2_server(client: H2Connection) -> Callable[[bytes], tuple[bytes, int, int]]:
    """python-hyper's h2 with libnghttp2's HPACK, as the edge configured it before."""
    server = use_native_hpack(H2Connection(_H2_CONFIG))
    server.initiate_connection()
    client.receive_data(server.data_to_send())

    def turn(wire: bytes) -> tuple[bytes, int, int]:
        began = time.process_time_ns()
        events = server.receive_data(wire)
        middle = time.process_time_ns()
        for event in events:
            if isinstance(event, RequestReceived):
                assert event.stream_id is not None
                server.send_headers(event.stream_id, _RESPONSE)
                server.send_data(event.stream_id, BODY, end_stream=True)
        answer = server.data_to_send()
        return answer, middle - began, time.process_time_ns() - middle

    return turn


def per_request(
    make: Callable[[H2Connection], Callable[[bytes], tuple[bytes, int, int]]],
    headers: list[tuple[bytes, bytes]],
    requests: int,
    streams: int,
) -> tuple[float, float]:
    """(µs in, µs out) of server CPU per request over `requests` requests, `streams` at a time."""
    client = _client()
    turn = make(client)
    answer, _, _ = turn(client.data_to_send())
    client.receive_data(answer)
    took_in = took_out = 0
    done = answered = 0
    while done < requests:
        batch = min(streams, requests - done)
        for _ in range(batch):
            client.send_headers(client.get_next_available_stream_id(), headers, end_stream=True)
        answer, took, sent = turn(client.data_to_send())
        took_in += took
        took_out += sent
        for event in client.receive_data(answer):
            if isinstance(event, DataReceived) and event.stream_id is not None:
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                answered += 1
        done += batch
    assert answered == requests, f"{answered} of {requests} answered"
    return took_in / requests / 1000, took_out / requests / 1000


ROUNDS = 5  # interleaved, so a busy moment of a shared machine hits every case alike


def bench(requests: int) -> str:
    cfg = load_config(None)
    token, _ = token_service(cfg.tokens).issue("benchvm1", ttl=cfg.tokens.max_ttl)
    headers = request_headers(token)
    in_cookie = [*headers[:-1], (b"cookie", f"mvm_token={token}".encode())]
    cases = {  # (the server, what the client sends)
        "the edge's: libnghttp2's session": (_native_server, headers),
        "the edge's, the token in a cookie (indexed)": (_native_server, in_cookie),
        "before: python-hyper's h2, libnghttp2's HPACK": (_h2_server, headers),
    }
    rows = []
    for streams in (10, 100):
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for make, sent in cases.values():
            per_request(make, sent, min(requests, 2000), streams)  # warm-up
        for _ in range(ROUNDS):
            for name, (make, sent) in cases.items():
                runs[name].append(per_request(make, sent, requests, streams))
        for name, results in runs.items():
            took_in, took_out = median([r[0] for r in results]), median([r[1] for r in results])
            rows.append([f"-m {streams}", name, f"{took_in:.1f}", f"{took_out:.1f}", f"{took_in + took_out:.1f}"])
    return "\n".join(
        [
            "## The HTTP/2 session alone: server CPU µs per request"
            " (no I/O; the headers h2load sends, a 100-byte answer)",
            "",
            f"Medians of {ROUNDS} interleaved runs of {requests} requests each.",
            "",
            table(["streams", "case", "request in", "answer out", "total"], rows),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=10_000, help="requests per run")
    args = parser.parse_args()
    print(bench(args.requests))


if __name__ == "__main__":
    main()
