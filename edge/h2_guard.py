"""Counting what an HTTP/2 client sends, frame by frame, against the [http2] flood limits.

It reads only the 9-byte frame headers of the byte stream, before h2 parses anything, so a
flood is noticed (and the connection ended) whatever h2 would have done with the frames:
CONTINUATION frames of one header block, oversized frames, and SETTINGS, PING,
WINDOW_UPDATE and RST_STREAM frames per `flood_window`.
"""

from __future__ import annotations

from collections.abc import Callable

from h2.errors import ErrorCodes

from .h2_settings import Http2Settings

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEADERS, _RST_STREAM, _SETTINGS, _PING, _WINDOW_UPDATE, _CONTINUATION = 1, 3, 4, 6, 8, 9
_END_HEADERS = 0x4
_FLOODS = {
    _RST_STREAM: "max_resets",
    _SETTINGS: "max_settings",
    _PING: "max_pings",
    _WINDOW_UPDATE: "max_window_updates",
}


class Verdict:
    """Why the connection must end: the GOAWAY code, a reason for metrics and a message."""

    __slots__ = ("code", "message", "reason")

    def __init__(self, code: ErrorCodes, reason: str, message: str) -> None:
        self.code = code
        self.reason = reason
        self.message = message


class FrameGuard:
    """Follows frame boundaries in the client's bytes; `feed` answers a Verdict when a limit is crossed."""

    __slots__ = ("_clock", "_counts", "_header", "_in_block", "_limits", "_preface", "_s", "_skip", "_window_end")

    def __init__(self, settings: Http2Settings, clock: Callable[[], float]) -> None:
        self._s = settings
        self._clock = clock
        self._preface = 0  # bytes of the client's connection preface checked so far
        self._skip = 0  # bytes still to pass over before the next frame header
        self._header = b""  # a frame header split across reads
        self._in_block = 0  # CONTINUATION frames of the header block being received
        self._limits = {kind: getattr(settings, key) for kind, key in _FLOODS.items()}
        self._counts = dict.fromkeys(_FLOODS, 0)
        self._window_end = 0.0

    def feed(self, data: bytes) -> Verdict | None:
        pos, end = 0, len(data)
        if self._preface < len(PREFACE):
            pos = min(end, len(PREFACE) - self._preface)
            if data[:pos] != PREFACE[self._preface : self._preface + pos]:
                return Verdict(ErrorCodes.PROTOCOL_ERROR, "preface", "not the HTTP/2 connection preface")
            self._preface += pos
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            need = 9 - len(self._header)
            self._header += data[pos : pos + need]
            pos += need
            if len(self._header) < 9:
                return None
            header, self._header = self._header, b""
            length = int.from_bytes(header[:3], "big")
            verdict = self._frame(header[3], header[4], length)
            if verdict is not None:
                return verdict
            self._skip = length
        return None

    def _frame(self, kind: int, flags: int, length: int) -> Verdict | None:
        s = self._s
        if length > s.max_frame_size:
            return Verdict(
                ErrorCodes.FRAME_SIZE_ERROR, "frame_size", f"a frame of {length} bytes (at most {s.max_frame_size})"
            )
        if kind == _HEADERS:
            self._in_block = 0 if flags & _END_HEADERS else 1
        elif kind == _CONTINUATION and self._in_block:
            self._in_block = 0 if flags & _END_HEADERS else self._in_block + 1
            if self._in_block > s.max_continuation_frames:
                return Verdict(
                    ErrorCodes.ENHANCE_YOUR_CALM, "continuation_flood",
                    f"more than {s.max_continuation_frames} CONTINUATION frames in one header block",
                )  # fmt: skip
        limit = self._limits.get(kind)
        if limit is None:
            return None
        now = self._clock()
        if now >= self._window_end:
            self._window_end = now + s.flood_window
            self._counts = dict.fromkeys(_FLOODS, 0)
        n = self._counts[kind] = self._counts[kind] + 1
        if n > limit:
            key = _FLOODS[kind]
            return Verdict(
                ErrorCodes.ENHANCE_YOUR_CALM,
                key.removeprefix("max_"),
                f"more than {limit} frames within {s.flood_window:g}s ({key})",
            )
        return None
