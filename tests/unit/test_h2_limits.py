"""Known HTTP/2 attacks and bad input from a raw client (hyperframe frames on a socket): each ends
in the GOAWAY or RST_STREAM its [http2] limit names, costs the edge little CPU, leaks nothing,
and another client is served meanwhile."""

from __future__ import annotations

import asyncio
import ssl
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from edge.h2_guard import PREFACE
from edge.h2_settings import Http2Settings
from edge.tls import make_dev_cert, server_context
from tests.unit.h2_client import H2Client, split_frames
from tests.unit.proxy_harness import VM, Edge, FakeBackend, Upstream, start_edge

PROTOCOL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR, CANCEL = 0x1, 0x5, 0x6, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB
LIMITS = Http2Settings(
    h2c=True, max_resets=50, max_settings=20, max_pings=20, max_window_updates=50, max_continuation_frames=4,
    max_header_list_size=8192, body_idle_timeout=0.3, stall_timeout=0.3, stream_buffer=65536,
)  # fmt: skip


@pytest.fixture
async def edge(upstream: Upstream) -> AsyncIterator[Edge]:
    backend = FakeBackend()
    backend.add_vm(VM, upstream.port)
    e = await start_edge(backend, http2=LIMITS)
    yield e
    await e.close()


class Raw:
    """Frames out exactly as the test writes them; frames back as they come, until the edge closes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder = Encoder()
        self.frames: list[Frame] = []
        self._buf = bytearray()  # bytes of a frame still arriving

    @classmethod
    async def open(cls, edge: Edge, settings: dict[int, int] | None = None) -> Raw:
        raw = cls(*await asyncio.open_connection("127.0.0.1", edge.port))
        frame = SettingsFrame(0)
        frame.settings = settings or {}
        raw.writer.write(PREFACE + frame.serialize())
        return raw

    def send(self, *frames: Frame) -> None:
        self.writer.write(b"".join(f.serialize() for f in frames))

    def headers(self, edge: Edge, sid: int, path: str = "/echo", end_stream: bool = True, **extra: str) -> HeadersFrame:
        fields = [(":method", "GET" if end_stream else "POST"), (":path", path), (":scheme", "http"),
                  (":authority", edge.host()), ("authorization", f"Bearer {edge.token()}"), *extra.items()]  # fmt: skip
        frame = HeadersFrame(sid, self.encoder.encode(fields))
        frame.flags.add("END_HEADERS")
        if end_stream:
            frame.flags.add("END_STREAM")
        return frame

    def feed(self, data: bytes) -> None:
        """Bytes read from the edge: their whole frames go to `frames`."""
        self._buf += data
        split_frames(self._buf, self.frames)

    async def until_closed(self, timeout: float = 10) -> list[Frame]:
        async with asyncio.timeout(timeout):
            try:
                while data := await self.reader.read(65536):
                    self._buf += data
            except ConnectionResetError:  # the edge closed with our flood unread: what came is enough
                pass
        split_frames(self._buf, self.frames)
        self.writer.close()
        return self.frames

    def goaway(self) -> GoAwayFrame:
        return next(f for f in self.frames if isinstance(f, GoAwayFrame))


async def _served_meanwhile(edge: Edge) -> None:
    c = await H2Client.open(edge.port)
    assert (await c.get(edge.host(), "/echo", headers={"authorization": f"Bearer {edge.token()}"})).status == 200
    await c.close()


async def _nothing_left(edge: Edge) -> None:
    for _ in range(100):
        if not edge.ctx.clients:
            break
        await asyncio.sleep(0.02)
    assert not edge.ctx.clients
    assert edge.ctx.metrics.registry.get_sample_value("mvm_h2_streams") == 0
    assert edge.ctx.pool.live_count(VM) <= edge.ctx.pool.idle_count(VM)  # only pooled ones, none in use
    assert VM not in edge.ctx.open_streams


async def _attack_ends(edge: Edge, raw: Raw, code: int) -> None:
    cpu = time.process_time()
    await _served_meanwhile(edge)
    await raw.until_closed()
    assert raw.goaway().error_code == code
    assert time.process_time() - cpu < 2.0
    await _nothing_left(edge)


async def test_rapid_reset(edge: Edge) -> None:
    raw = await Raw.open(edge)
    for i in range(200):
        sid = 2 * i + 1
        raw.send(raw.headers(edge, sid), RstStreamFrame(sid, error_code=CANCEL))
    await _attack_ends(edge, raw, ENHANCE_YOUR_CALM)
    assert edge.ctx.metrics.registry.get_sample_value("mvm_h2_goaways_total", {"reason": "resets"}) == 1


async def test_continuation_flood(edge: Edge) -> None:
    raw = await Raw.open(edge)
    first = raw.headers(edge, 1)
    first.flags.discard("END_HEADERS")
    raw.send(first, *(ContinuationFrame(1, b"") for _ in range(50)))
    await _attack_ends(edge, raw, ENHANCE_YOUR_CALM)


async def test_hpack_bomb(edge: Edge) -> None:
    raw = await Raw.open(edge)
    big = ("x-bomb", "b" * 4000)
    block = raw.encoder.encode([big]) + raw.encoder.encode([big] * 500)  # then one byte per copy
    raw.send(HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM"]))
    await _attack_ends(edge, raw, ENHANCE_YOUR_CALM)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SettingsFrame(0),
        lambda: PingFrame(0, b"12345678"),
        lambda: WindowUpdateFrame(0, window_increment=1),
    ],
    ids=["settings", "ping", "window_update"],
)
async def test_control_frame_floods(edge: Edge, make: object) -> None:
    raw = await Raw.open(edge)
    raw.send(*(make() for _ in range(200)))  # type: ignore[operator]
    await _attack_ends(edge, raw, ENHANCE_YOUR_CALM)


async def test_body_never_sent_is_reset(edge: Edge) -> None:
    raw = await Raw.open(edge)
    raw.send(raw.headers(edge, 1, "/upload", end_stream=False, **{"content-length": "10"}))
    await _stream_one_cancelled(edge, raw)


async def test_zero_window_stall_is_reset(edge: Edge) -> None:
    raw = await Raw.open(edge, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0})
    raw.send(raw.headers(edge, 1, "/download?size=10000000"))
    await _stream_one_cancelled(edge, raw)


async def _stream_one_cancelled(edge: Edge, raw: Raw) -> None:
    """Others are served meanwhile; stream 1 is reset with CANCEL within 5 s; nothing is left after."""
    await _served_meanwhile(edge)
    async with asyncio.timeout(5):
        while not any(isinstance(f, RstStreamFrame) for f in raw.frames):
            data = await raw.reader.read(65536)
            assert data
            raw.feed(data)
    rst = next(f for f in raw.frames if isinstance(f, RstStreamFrame))
    assert (rst.stream_id, rst.error_code) == (1, CANCEL)
    raw.writer.close()
    await _nothing_left(edge)


async def test_malformed_preface_after_alpn_h2(upstream: Upstream) -> None:
    backend = FakeBackend()
    backend.add_vm(VM, upstream.port)
    with tempfile.TemporaryDirectory() as d:
        cert, key = make_dev_cert("edge.test", Path(d))
        client_ctx = ssl.create_default_context(cafile=str(cert))
        client_ctx.set_alpn_protocols(["h2"])
        edge = await start_edge(backend, tls=(server_context(cert, key, h2=True), client_ctx), http2=LIMITS)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", edge.port, ssl=client_ctx, server_hostname=edge.host()
        )
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + SettingsFrame(0).serialize())
        raw = Raw(reader, writer)
        await raw.until_closed()
        assert raw.goaway().error_code == PROTOCOL_ERROR
        await _nothing_left(edge)
        await edge.close()


async def test_frames_on_a_closed_stream(edge: Edge) -> None:
    """RFC 9113 5.1: DATA on a stream the client ended (half-closed remote) is an error of type
    STREAM_CLOSED; libnghttp2 makes it the connection's (5.4.1 allows it), as issue 15's "bad input"
    asks: a GOAWAY STREAM_CLOSED and a closed connection, others served, nothing leaked."""
    raw = await Raw.open(edge)
    raw.send(raw.headers(edge, 1), DataFrame(1, b"late", flags=["END_STREAM"]), raw.headers(edge, 3))
    await _attack_ends(edge, raw, STREAM_CLOSED)


async def test_oversized_frame(edge: Edge) -> None:
    raw = await Raw.open(edge)
    raw.send(raw.headers(edge, 1, "/upload", end_stream=False), DataFrame(1, b"x" * 20000))
    await _attack_ends(edge, raw, FRAME_SIZE_ERROR)


@pytest.mark.parametrize(
    "block", [b"\x80", b"\x00\x01\x61\x81\x00", b"\x82\x20"], ids=["index_0", "bad_huffman", "late_table_size"]
)
async def test_a_header_block_that_does_not_decode(edge: Edge, block: bytes) -> None:
    """libnghttp2's inflater refuses it; the connection ends with COMPRESSION_ERROR (RFC 9113 4.3)."""
    raw = await Raw.open(edge)
    raw.send(raw.headers(edge, 1), HeadersFrame(3, block, flags=["END_HEADERS", "END_STREAM"]))
    await _attack_ends(edge, raw, COMPRESSION_ERROR)
