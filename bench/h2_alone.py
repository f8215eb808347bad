"""The CPU that python-hyper's h2 alone spends per request, as the edge uses it: no sockets, no TLS.

`python -m bench.h2_alone [--requests N]`. A client connection (h2's own) sends requests with the
headers h2load sends through the edge (its Bearer token never indexed by HPACK, as nghttp2 sends
it); the server connection, configured as the edge's (`edge.h2_core.SERVER_CONFIG`), takes them
in and answers each with the headers an nginx upstream gives and a 100-byte body, `streams` at a
time (h2load's -m). Only the server side's calls are timed (process CPU time), split into taking
a request in (frame, HPACK, header validation, stream state) and sending its answer out. The same
with h2's default configuration shows what checking the edge's own outbound headers would cost;
with the token in a cookie (which HPACK indexes after the first request, where a never-indexed
Authorization value is Huffman-decoded again in every request), what that costs; each also with
python-hyper's pure-Python hpack in place of libnghttp2's (`edge.hpack_native`), what that saves.
Set against the edge's CPU per request under h2load (bench.h2_bench), it is h2's share of it.
"""

from __future__ import annotations

import argparse
import time

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, RequestReceived

from edge.h2_core import SERVER_CONFIG
from edge.hpack_native import use_native_hpack
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


def per_request(
    config: H2Configuration, native: bool, headers: list[tuple[bytes, bytes]], requests: int, streams: int
) -> tuple[float, float]:
    """(µs in, µs out) of server CPU per request over `requests` requests, `streams` at a time
    (`native`: the server's HPACK is libnghttp2's, as the edge's)."""
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server = H2Connection(config)
    if native:
        use_native_hpack(server)
    client.initiate_connection()
    server.initiate_connection()
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    took_in = took_out = 0
    done = 0
    while done < requests:
        batch = min(streams, requests - done)
        for _ in range(batch):
            client.send_headers(client.get_next_available_stream_id(), headers, end_stream=True)
        wire = client.data_to_send()
        began = time.process_time_ns()
        events = server.receive_data(wire)
        middle = time.process_time_ns()
        for event in events:
            if isinstance(event, RequestReceived):
                assert event.stream_id is not None
                server.send_headers(event.stream_id, _RESPONSE)
                server.send_data(event.stream_id, BODY, end_stream=True)
        answer = server.data_to_send()
        took_in += middle - began
        took_out += time.process_time_ns() - middle
        for event in client.receive_data(answer):
            if isinstance(event, DataReceived) and event.stream_id is not None:
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        done += batch
    return took_in / requests / 1000, took_out / requests / 1000


ROUNDS = 5  # interleaved, so a busy moment of a shared machine hits every case alike


def bench(requests: int) -> str:
    cfg = load_config(None)
    token, _ = token_service(cfg.tokens).issue("benchvm1", ttl=cfg.tokens.max_ttl)
    headers = request_headers(token)
    in_cookie = [*headers[:-1], (b"cookie", f"mvm_token={token}".encode())]
    checked = H2Configuration(client_side=False, header_encoding=None)
    cases = {  # (the server's configuration, libnghttp2's HPACK, what the client sends)
        "the edge's configuration": (SERVER_CONFIG, True, headers),
        "the edge's, hpack in Python": (SERVER_CONFIG, False, headers),
        "h2's defaults (outbound headers checked)": (checked, True, headers),
        "the edge's, the token in a cookie (indexed)": (SERVER_CONFIG, True, in_cookie),
        "the edge's, the token in a cookie, hpack in Python": (SERVER_CONFIG, False, in_cookie),
    }
    rows = []
    for streams in (10, 100):
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for config, native, sent in cases.values():
            per_request(config, native, sent, min(requests, 2000), streams)  # warm-up
        for _ in range(ROUNDS):
            for name, (config, native, sent) in cases.items():
                runs[name].append(per_request(config, native, sent, requests, streams))
        for name, results in runs.items():
            took_in, took_out = median([r[0] for r in results]), median([r[1] for r in results])
            rows.append([f"-m {streams}", name, f"{took_in:.0f}", f"{took_out:.0f}", f"{took_in + took_out:.0f}"])
    return "\n".join(
        [
            "## h2 alone: server CPU µs per request (no I/O; the headers h2load sends, a 100-byte answer)",
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
