"""HPACK alone, python-hyper's hpack against libnghttp2's through ctypes (edge.hpack_native).

`python -m bench.hpack_alone [--blocks N]`. CPU µs per header block: decoding the request h2load
sends through the edge (its Bearer token never-indexed, so decoded again each time; or the token
in a cookie, indexed) and encoding the answer the edge sends (nginx's headers, with and without
the edge's never-indexed Set-Cookie). Then what ctypes itself costs: a libnghttp2 call that does
nothing, and each field of a block of indexed fields (one inflate call per field, the least C
work there is).
"""

from __future__ import annotations

import argparse
import ctypes
import time
from collections.abc import Callable

from hpack import Decoder, Encoder, NeverIndexedHeaderTuple

from edge.hpack_native import LIBRARY, NativeDecoder, NativeEncoder
from edge.settings import token_service
from mvm.config import load_config

from .h2_alone import _RESPONSE, request_headers
from .stats import median, table

ROUNDS = 5
_INDEXED_FIELDS = 64


def _us_per_call(call: Callable[[], object], calls: int) -> float:
    """Median over ROUNDS runs of `calls` calls: process CPU µs per call."""
    call()
    runs = []
    for _ in range(ROUNDS):
        began = time.process_time_ns()
        for _ in range(calls):
            call()
        runs.append((time.process_time_ns() - began) / calls / 1000)
    return median(runs)


def _decode_row(name: str, fields: list[tuple[bytes, bytes]], blocks: int) -> list[str]:
    """A block as the client's second request sends it (its indexed fields already in the table)."""
    encoder = Encoder()
    first, block = encoder.encode(fields), encoder.encode(fields)
    python, native = Decoder(), NativeDecoder()
    python.decode(first, raw=True)
    native.decode(first, raw=True)
    took_py = _us_per_call(lambda: python.decode(block, raw=True), blocks)
    took_c = _us_per_call(lambda: native.decode(block, raw=True), blocks)
    return [name, str(len(fields)), f"{took_py:.1f}", f"{took_c:.1f}", f"{took_py / took_c:.1f}"]


def _encode_row(name: str, fields: list[tuple[bytes, bytes]], blocks: int) -> list[str]:
    python, native = Encoder(), NativeEncoder()
    took_py = _us_per_call(lambda: python.encode(fields), blocks)
    took_c = _us_per_call(lambda: native.encode(fields), blocks)
    return [name, str(len(fields)), f"{took_py:.1f}", f"{took_c:.1f}", f"{took_py / took_c:.1f}"]


def bench(blocks: int) -> str:
    cfg = load_config(None)
    token, _ = token_service(cfg.tokens).issue("benchvm1", ttl=cfg.tokens.max_ttl)
    sent = request_headers(token)
    bearer = [*sent[:-1], NeverIndexedHeaderTuple(*sent[-1])]  # as nghttp2 (h2load) sends it
    in_cookie = [*sent[:-1], (b"cookie", f"mvm_token={token}".encode())]
    set_cookie = NeverIndexedHeaderTuple(b"set-cookie", f"mvm_token={token}; Path=/; HttpOnly; Secure".encode())
    rows = [
        _decode_row("decode: h2load's request, Bearer token (never indexed)", bearer, blocks),
        _decode_row("decode: the same, the token in a cookie (indexed)", in_cookie, blocks),
        _encode_row("encode: nginx's answer", _RESPONSE, blocks),
        _encode_row("encode: nginx's answer + the edge's Set-Cookie (never indexed)", [*_RESPONSE, set_cookie], blocks),
    ]
    nothing = ctypes.PyDLL(LIBRARY).nghttp2_version  # returns a pointer to a static struct
    nothing.argtypes, nothing.restype = [ctypes.c_int], ctypes.c_void_p
    call_us = _us_per_call(lambda: nothing(0), blocks * 10)
    indexed, inflater = b"\x82" * _INDEXED_FIELDS, NativeDecoder()
    field_us = _us_per_call(lambda: inflater.decode(indexed, raw=True), blocks) / _INDEXED_FIELDS
    return "\n".join(
        [
            "## HPACK alone: CPU µs per header block, hpack (pure Python) against libnghttp2 (ctypes)",
            "",
            f"Medians of {ROUNDS} runs of {blocks} blocks each.",
            "",
            table(["block", "fields", "hpack µs", "libnghttp2 µs", "hpack / libnghttp2"], rows),
            "",
            f"ctypes: a libnghttp2 call that does nothing {call_us:.2f} µs; each field of a block of "
            f"{_INDEXED_FIELDS} indexed fields {field_us:.2f} µs (one inflate call, its result read).",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=20_000, help="header blocks per run")
    args = parser.parse_args()
    print(bench(args.blocks))


if __name__ == "__main__":
    main()
