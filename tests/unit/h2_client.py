"""A small HTTP/2 client for tests, on python-hyper's h2: requests, and raw frames for attacks."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from hyperframe.frame import Frame


@dataclass
class Answer:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    fields: list[tuple[bytes, bytes]] = field(default_factory=list)  # as HPACK gave them (NeverIndexedHeaderTuple)
    body: bytearray = field(default_factory=bytearray)
    reset: int | None = None  # the RST_STREAM code, when the edge reset the stream
    done: asyncio.Event = field(default_factory=asyncio.Event)


class H2Client:
    """One connection; `request` sends a stream and `answer(sid)` waits for its end."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, window: int = 1 << 24) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.answers: dict[int, Answer] = {}
        self._outgoing: dict[int, memoryview] = {}
        self.frames: list[Frame] = []  # every frame the edge sent, parsed apart from h2's state
        self._raw = bytearray()
        self.terminated: ConnectionTerminated | None = None
        self.closed = asyncio.Event()
        self.auto_ack = True
        self.conn.initiate_connection()
        if window > 65535:
            self.conn.increment_flow_control_window(window - 65535)
        self.flush()
        self._reader_task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(
        cls, port: int, ssl_ctx: ssl.SSLContext | None = None, host: str = "", window: int = 1 << 24
    ) -> H2Client:
        if ssl_ctx is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx, server_hostname=host)
        return cls(reader, writer, window)

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def request(
        self,
        host: str,
        path: str,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [(b":method", method.encode()), (b":path", path.encode()), (b":scheme", b"https"),
                  (b":authority", host.encode())]  # fmt: skip
        fields += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        self.answers[sid] = Answer()
        self.conn.send_headers(sid, fields, end_stream=body is None)
        if body is not None:
            self._outgoing[sid] = memoryview(body)
            self._push()
        self.flush()
        return sid

    def _push(self) -> None:
        """Send what the edge's windows allow of request bodies."""
        for sid, rest in list(self._outgoing.items()):
            while rest:
                n = min(len(rest), self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
                if n <= 0:
                    break
                self.conn.send_data(sid, bytes(rest[:n]))
                rest = rest[n:]
            if rest:
                self._outgoing[sid] = rest
            else:
                del self._outgoing[sid]
                self.conn.end_stream(sid)

    async def get(self, host: str, path: str, **kw: object) -> Answer:
        sid = self.request(host, path, **kw)  # type: ignore[arg-type]
        return await self.answer(sid)

    async def answer(self, sid: int, timeout: float = 10) -> Answer:
        ans = self.answers[sid]
        await asyncio.wait_for(ans.done.wait(), timeout)
        return ans

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                self._split(data)
                for event in self.conn.receive_data(data):
                    self._event(event)
                self._push()
                self.flush()
        except Exception:  # the edge's GOAWAY may leave h2 refusing more: the test looks at what came
            pass
        finally:
            self.closed.set()
            for ans in self.answers.values():
                ans.done.set()

    def _split(self, data: bytes) -> None:
        self._raw += data
        split_frames(self._raw, self.frames)

    def _event(self, event: object) -> None:
        if isinstance(event, ResponseReceived):
            ans = self.answers[event.stream_id]
            ans.fields = list(event.headers or ())
            ans.headers = dict(ans.fields)
            ans.status = int(ans.headers[b":status"])
        elif isinstance(event, DataReceived):
            self.answers[event.stream_id].body += event.data
            if self.auto_ack:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, TrailersReceived):
            self.answers[event.stream_id].headers.update(dict(event.headers or ()))
        elif isinstance(event, StreamEnded):
            self.answers[event.stream_id].done.set()
        elif isinstance(event, StreamReset):
            ans = self.answers.get(event.stream_id)
            if ans is not None:
                ans.reset = event.error_code
                ans.done.set()
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event

    async def close(self) -> None:
        self._reader_task.cancel()
        self.writer.close()
        with __import__("contextlib").suppress(Exception):
            await self.writer.wait_closed()


def split_frames(buf: bytearray, into: list[Frame]) -> None:
    """Move every whole frame at the start of `buf` into `into`; a frame still arriving stays in `buf`."""
    while len(buf) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(buf[:9]))
        if len(buf) < 9 + length:
            return
        frame.parse_body(memoryview(buf[9 : 9 + length]))
        into.append(frame)
        del buf[: 9 + length]
