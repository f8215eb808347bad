"""A server-side HTTP/2 session in C: libnghttp2's `nghttp2_session` through ctypes, sans-IO.

libnghttp2 keeps the protocol's state machine (frames, HPACK, stream states, flow-control
windows, RFC 9113 §8.2's header checks), as it does for curl, Apache httpd's mod_http2 and
nghttpx. Bytes go in with `receive` and come out of `send`; what the client did comes back
as compact tuples in `events` (one per request, not one per frame or header), which the
edge's core (`edge.h2_core`) walks. Answer bytes are pulled from an `AnswerSource` as the
client's windows allow. Request body bytes are acknowledged to the client only when the
core says so (`consume`): libnghttp2's automatic WINDOW_UPDATEs are off.

The structs are declared by hand against libnghttp2 1.52's ABI (Debian 12's libnghttp2-14;
no -dev headers): nghttp2_frame_hd, the start of nghttp2_headers, nghttp2_nv,
nghttp2_settings_entry and nghttp2_data_provider; callbacks are set through the setters.
"""

from __future__ import annotations

import ctypes
import struct
import weakref
from collections.abc import Sequence
from typing import Any, Protocol

from hpack.struct import HeaderTuple

from .hpack_native import shared_library

# Event kinds (the first item of each tuple in `ServerSession.events`)
REQUEST = 0  # (REQUEST, stream id, [(name, value), ...], ended): a request's header block, whole
DATA = 1  # (DATA, stream id, bytes): request body bytes (to `consume` once they went on)
END = 2  # (END, stream id): the request's body is over (END_STREAM on DATA, or trailers)
RESET = 3  # (RESET, stream id): the client sent RST_STREAM
CLOSED = 4  # (CLOSED, stream id, code): libnghttp2 closed the stream (sent, reset, or refused)
GOAWAY = 5  # (GOAWAY, 0): the client sent GOAWAY
OVERSIZED = 6  # (OVERSIZED, stream id): a header list past `max_header_list_size` (the HPACK bomb)

# Settings identifiers (RFC 9113 §6.5.2)
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x7
_SETTINGS_ENTRY_AT = 9  # after the frame header
_FLAG_END_STREAM = 0x1
_HCAT_REQUEST, _HCAT_HEADERS = 0, 3
_NV_FLAG_NO_INDEX = 0x01
_DATA_FLAG_EOF, _DATA_FLAG_NO_END_STREAM = 0x01, 0x02
_ERR_DEFERRED = -508
_ERR_TEMPORAL_CALLBACK_FAILURE = -521
_ERR_PAUSE = -526
_ERR_CALLBACK_FAILURE = -902
_ENTRY_OVERHEAD = 32  # a field's size counts its name, its value and 32 (RFC 9113 §6.5.2)

_vp, _size, _ssize, _cint, _i32, _u32, _u8 = (
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_int32, ctypes.c_uint32, ctypes.c_uint8
)  # fmt: skip


class _FrameHead(ctypes.Structure):
    """nghttp2_frame_hd, then nghttp2_headers' fields up to `cat` (read only for HEADERS)."""

    _fields_ = (
        ("length", _size),
        ("stream_id", _i32),
        ("type", _u8),
        ("flags", _u8),
        ("reserved", _u8),
        ("padlen", _size),
        ("pri_stream_id", _i32),  # nghttp2_priority_spec: stream_id, weight, exclusive
        ("pri_weight", _i32),
        ("pri_exclusive", _u8),
        ("nva", _vp),
        ("nvlen", _size),
        ("cat", _cint),  # nghttp2_headers_category
    )


class _Nv(ctypes.Structure):
    """nghttp2_nv as libnghttp2 reads it (it copies the names and values it is given)."""

    _fields_ = (("name", ctypes.c_char_p), ("value", ctypes.c_char_p), ("namelen", _size), ("valuelen", _size),
                ("flags", _u8))  # fmt: skip


_NV_LAYOUT = "QQQQB7x"  # nghttp2_nv packed by struct: two pointers, two lengths, the flags, padding to 40
_NV_MAX = 64  # fields of one answer head packed in the scratch arrays; more take the slow way
_NV_BYTES_MAX = 16384  # bytes of their names and values


class _SettingsEntry(ctypes.Structure):
    _fields_ = (("settings_id", _i32), ("value", _u32))


_ReadCallback = ctypes.CFUNCTYPE(_ssize, _vp, _i32, _vp, _size, ctypes.POINTER(_u32), _vp, _vp)


class _DataProvider(ctypes.Structure):
    """nghttp2_data_provider: a source (unused: the stream id says whose bytes) and its read callback."""

    _fields_ = (("source", _vp), ("read_callback", _ReadCallback))


# The callbacks' C types (nghttp2_on_*_callback); `frame` is read with _FrameHead.from_address.
_OnBeginHeaders = ctypes.CFUNCTYPE(_cint, _vp, _vp, _vp)
# name and value come as bytes: libnghttp2 NUL-terminates both (the lengths are checked against them).
_OnHeader = ctypes.CFUNCTYPE(_cint, _vp, _vp, ctypes.c_char_p, _size, ctypes.c_char_p, _size, _u8, _vp)
_OnFrameRecv = ctypes.CFUNCTYPE(_cint, _vp, _vp, _vp)
_OnDataChunkRecv = ctypes.CFUNCTYPE(_cint, _vp, _u8, _i32, _vp, _size, _vp)
_OnStreamClose = ctypes.CFUNCTYPE(_cint, _vp, _i32, _u32, _vp)
_OnError = ctypes.CFUNCTYPE(_cint, _vp, _cint, _vp, _size, _vp)


def _typed(lib: ctypes.PyDLL) -> ctypes.PyDLL:
    """The session functions' C types, set once on the library that hpack_native loaded."""
    p_vp = ctypes.POINTER(_vp)
    nva = _vp  # a packed array's address (_NvScratch) or an array of _Nv
    signatures: dict[str, tuple[type | None, list[type]]] = {
        "nghttp2_session_callbacks_new": (_cint, [p_vp]),
        "nghttp2_session_callbacks_del": (None, [_vp]),
        "nghttp2_session_callbacks_set_on_begin_headers_callback": (None, [_vp, _OnBeginHeaders]),
        "nghttp2_session_callbacks_set_on_header_callback": (None, [_vp, _OnHeader]),
        "nghttp2_session_callbacks_set_on_invalid_header_callback": (None, [_vp, _OnHeader]),
        "nghttp2_session_callbacks_set_on_frame_recv_callback": (None, [_vp, _OnFrameRecv]),
        "nghttp2_session_callbacks_set_on_data_chunk_recv_callback": (None, [_vp, _OnDataChunkRecv]),
        "nghttp2_session_callbacks_set_on_stream_close_callback": (None, [_vp, _OnStreamClose]),
        "nghttp2_session_callbacks_set_error_callback2": (None, [_vp, _OnError]),
        "nghttp2_option_new": (_cint, [p_vp]),
        "nghttp2_option_del": (None, [_vp]),
        "nghttp2_option_set_no_auto_window_update": (None, [_vp, _cint]),
        "nghttp2_session_server_new2": (_cint, [p_vp, _vp, _vp, _vp]),
        "nghttp2_session_del": (None, [_vp]),
        "nghttp2_session_mem_recv": (_ssize, [_vp, ctypes.c_char_p, _size]),
        "nghttp2_session_mem_send": (_ssize, [_vp, ctypes.POINTER(ctypes.POINTER(ctypes.c_char))]),
        "nghttp2_submit_settings": (_cint, [_vp, _u8, ctypes.POINTER(_SettingsEntry), _size]),
        "nghttp2_submit_window_update": (_cint, [_vp, _u8, _i32, _i32]),
        "nghttp2_submit_response": (_cint, [_vp, _i32, nva, _size, ctypes.POINTER(_DataProvider)]),
        "nghttp2_submit_trailer": (_cint, [_vp, _i32, nva, _size]),
        "nghttp2_submit_rst_stream": (_cint, [_vp, _u8, _i32, _u32]),
        "nghttp2_submit_goaway": (_cint, [_vp, _u8, _i32, _u32, ctypes.c_char_p, _size]),
        "nghttp2_session_terminate_session": (_cint, [_vp, _u32]),
        "nghttp2_session_resume_data": (_cint, [_vp, _i32]),
        "nghttp2_session_consume": (_cint, [_vp, _i32, _size]),
        "nghttp2_session_want_read": (_cint, [_vp]),
        "nghttp2_session_get_last_proc_stream_id": (_i32, [_vp]),
        "nghttp2_session_get_stream_remote_window_size": (_i32, [_vp, _i32]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


_lib = _typed(shared_library())
_string_at = ctypes.string_at
_memmove = ctypes.memmove
_frame_at = _FrameHead.from_address


class AnswerSource(Protocol):
    """Where a stream's answer bytes wait (edge.h2_core.H2Core)."""

    def take(self, sid: int, n: int) -> tuple[bytes, bool, Sequence[tuple[bytes, bytes]] | None] | None:
        """Up to `n` answer bytes of stream `sid`, whether they are its last, and its trailers
        then; None while none wait (the stream is deferred until `resume`)."""
        ...


def _flags(field: tuple[bytes, bytes]) -> int:
    """hpack's NeverIndexedHeaderTuple stays out of HPACK's table (the edge's Set-Cookie)."""
    return 0 if type(field) is tuple or not isinstance(field, HeaderTuple) or field.indexable else _NV_FLAG_NO_INDEX


class _NvScratch:
    """Header fields as nghttp2_nv, built in two buffers made once: the fields' bytes copied in one
    piece, the nv structs packed by struct in one call. Setting ctypes fields one by one cost 3 us
    per answer head, most of libnghttp2's part of an answer. libnghttp2 copies what it is given
    before submit_* returns, and the event loop has one thread, so one pair of buffers serves all."""

    def __init__(self) -> None:
        self._bytes = (ctypes.c_char * _NV_BYTES_MAX)()
        self._bytes_at = ctypes.addressof(self._bytes)
        self._nvs = (ctypes.c_char * (struct.calcsize("=" + _NV_LAYOUT) * _NV_MAX))()
        self.address = ctypes.addressof(self._nvs)
        self._packers: dict[int, struct.Struct] = {}

    def nva(self, headers: Sequence[tuple[bytes, bytes]]) -> int | ctypes.Array[_Nv]:
        """The fields as nghttp2_nv, valid until the next call: this scratch's address, or an array
        of their own for a head too big for it."""
        parts: list[bytes] = []
        flat: list[int] = []
        start = at = self._bytes_at
        for field in headers:
            name, value = field
            n, v = len(name), len(value)
            parts += field
            flat += (at, at + n, n, v, 0 if type(field) is tuple else _flags(field))
            at += n + v
        count = len(headers)
        if count > _NV_MAX or at - start > _NV_BYTES_MAX:
            return _own_nva(headers)
        _memmove(start, b"".join(parts), at - start)
        packer = self._packers.get(count)
        if packer is None:
            packer = self._packers[count] = struct.Struct("=" + _NV_LAYOUT * count)
        packer.pack_into(self._nvs, 0, *flat)
        return self.address


def _own_nva(headers: Sequence[tuple[bytes, bytes]]) -> ctypes.Array[_Nv]:
    nva = (_Nv * len(headers))()
    for nv, field in zip(nva, headers, strict=True):
        name, value = field
        nv.name, nv.namelen, nv.value, nv.valuelen, nv.flags = name, len(name), value, len(value), _flags(field)
    return nva


_nva = _NvScratch().nva


def goaway_in(wire: bytes) -> tuple[int, bytes] | None:
    """The error code and debug data of the first GOAWAY frame in `wire` (whole frames), if any."""
    pos, end = 0, len(wire)
    while pos + 9 <= end:
        length = int.from_bytes(wire[pos : pos + 3], "big")
        if wire[pos + 3] == _GOAWAY and length >= 8:
            payload = wire[pos + 9 : pos + 9 + length]
            return int.from_bytes(payload[4:8], "big"), payload[8:]
        pos += 9 + length
    return None


class SessionError(Exception):
    """libnghttp2 refused a call (its words after the function's name)."""

    def __init__(self, function: str, code: int) -> None:
        super().__init__(f"{function}: {_lib.nghttp2_strerror(code).decode()}")
        self.code = code


class ServerSession:
    """One client connection's nghttp2_session (server side); `close` frees it."""

    def __init__(self, source: AnswerSource, max_header_list_size: int) -> None:
        self.events: list[tuple] = []  # what `receive` found, for the caller to walk and clear
        self.error = ""  # libnghttp2's words on the last error it met
        self.max_header_list_size = max_header_list_size
        self._source = source
        self._fields: list[tuple[bytes, bytes]] = []  # of the header block being received
        self._fields_size = 0
        # Where mem_send leaves its bytes; slicing a c_char pointer gives bytes (typeshed says a list).
        self._out: Any = ctypes.POINTER(ctypes.c_char)()
        self._out_ref = ctypes.byref(self._out)
        # The C callbacks hold these bound methods; they live as long as the session does.
        self._callbacks = (
            _OnBeginHeaders(self._on_begin_headers), _OnHeader(self._on_header), _OnHeader(self._on_invalid_header),
            _OnFrameRecv(self._on_frame_recv),
            _OnDataChunkRecv(self._on_data_chunk), _OnStreamClose(self._on_stream_close), _OnError(self._on_error),
        )  # fmt: skip
        self._provider = _DataProvider(None, _ReadCallback(self._read))
        self._provider_ref = ctypes.byref(self._provider)
        callbacks, option, session = _vp(), _vp(), _vp()
        if _lib.nghttp2_session_callbacks_new(ctypes.byref(callbacks)) or _lib.nghttp2_option_new(ctypes.byref(option)):
            raise MemoryError("nghttp2_session_callbacks_new")
        try:
            setters = (
                _lib.nghttp2_session_callbacks_set_on_begin_headers_callback,
                _lib.nghttp2_session_callbacks_set_on_header_callback,
                _lib.nghttp2_session_callbacks_set_on_invalid_header_callback,
                _lib.nghttp2_session_callbacks_set_on_frame_recv_callback,
                _lib.nghttp2_session_callbacks_set_on_data_chunk_recv_callback,
                _lib.nghttp2_session_callbacks_set_on_stream_close_callback,
                _lib.nghttp2_session_callbacks_set_error_callback2,
            )
            for setter, callback in zip(setters, self._callbacks, strict=True):
                setter(callbacks, callback)
            _lib.nghttp2_option_set_no_auto_window_update(option, 1)
            code = _lib.nghttp2_session_server_new2(ctypes.byref(session), callbacks, None, option)
        finally:
            _lib.nghttp2_session_callbacks_del(callbacks)
            _lib.nghttp2_option_del(option)
        if code:
            raise SessionError("nghttp2_session_server_new2", code)
        self._session: int | None = session.value
        self._free = weakref.finalize(self, _lib.nghttp2_session_del, session.value)

    def close(self) -> None:
        """Free the C session now (never from inside one of its callbacks; no call after it);
        one never closed is freed when it is collected."""
        self._session = None
        self._free()

    # -- bytes in and out ------------------------------------------------------------------

    def receive(self, data: bytes) -> int:
        """Feed the client's bytes; events land in `events`. Below 0: a fatal libnghttp2 error
        (the connection is over; `error` says why)."""
        taken: int = _lib.nghttp2_session_mem_recv(self._session, data, len(data))
        if taken < 0:
            self.error = self.error or _lib.nghttp2_strerror(taken).decode()
        return taken

    def send(self) -> bytes:
        """What libnghttp2 has to write now (frames queued, and answer bytes the windows allow)."""
        session, out, out_ref = self._session, self._out, self._out_ref
        mem_send = _lib.nghttp2_session_mem_send
        n = mem_send(session, out_ref)
        if n <= 0:
            return b""
        first: bytes = out[:n]  # a c_char pointer's slice is bytes
        n = mem_send(session, out_ref)
        if n <= 0:
            return first
        chunks = [first]
        while n > 0:
            chunks.append(out[:n])
            n = mem_send(session, out_ref)
        return b"".join(chunks)

    # -- what the server submits -------------------------------------------------------------

    def start(self, settings: Sequence[tuple[int, int]], max_streams: int, window_increment: int) -> bytes:
        """The server's first bytes: its SETTINGS, and a WINDOW_UPDATE widening the connection's
        receive window by `window_increment`. The SETTINGS frame advertises `max_streams` concurrent
        streams, while libnghttp2 is given twice as many: past the advertised limit the edge refuses
        a stream itself (REFUSED_STREAM, a stream error: a client may open streams before it read our
        SETTINGS), and libnghttp2's own check, a connection error, is kept for a client far past it."""
        entries = [(SETTINGS_MAX_CONCURRENT_STREAMS, 2 * max_streams), *settings]
        iv = (_SettingsEntry * len(entries))(*(_SettingsEntry(key, value) for key, value in entries))
        self._check("nghttp2_submit_settings", _lib.nghttp2_submit_settings(self._session, 0, iv, len(entries)))
        if window_increment > 0:
            code = _lib.nghttp2_submit_window_update(self._session, 0, 0, window_increment)
            self._check("nghttp2_submit_window_update", code)
        wire = bytearray(self.send())
        entry = _SETTINGS_ENTRY_AT  # the first entry of the SETTINGS frame that comes first
        assert wire[3] == _SETTINGS and wire[entry : entry + 2] == SETTINGS_MAX_CONCURRENT_STREAMS.to_bytes(2, "big")
        wire[entry + 2 : entry + 6] = max_streams.to_bytes(4, "big")
        return bytes(wire)

    def respond(self, sid: int, headers: Sequence[tuple[bytes, bytes]], end: bool) -> None:
        """The answer's HEADERS (`:status` first); unless `end`, its DATA comes from the source."""
        nva = _nva(headers)
        code = _lib.nghttp2_submit_response(self._session, sid, nva, len(headers), None if end else self._provider_ref)
        self._check("nghttp2_submit_response", code)

    def resume(self, sid: int) -> None:
        """The source has bytes again for a stream it deferred."""
        _lib.nghttp2_session_resume_data(self._session, sid)

    def reset(self, sid: int, code: int) -> None:
        _lib.nghttp2_submit_rst_stream(self._session, 0, sid, code)

    def goaway(self, code: int, last_stream: int, debug: bytes = b"") -> None:
        _lib.nghttp2_submit_goaway(self._session, 0, last_stream, code, debug, len(debug))

    def terminate(self, code: int) -> None:
        """GOAWAY with the last stream processed; the session reads nothing more."""
        _lib.nghttp2_session_terminate_session(self._session, code)

    def consume(self, sid: int, n: int) -> None:
        """`n` body bytes of stream `sid` are done with: the client may send as many more."""
        _lib.nghttp2_session_consume(self._session, sid, n)

    # -- state ---------------------------------------------------------------------------------

    def want_read(self) -> bool:
        """False once the session is over (a terminating GOAWAY sent, or GOAWAY and no streams)."""
        return bool(_lib.nghttp2_session_want_read(self._session))

    def last_stream(self) -> int:
        """The highest stream id the client opened that was processed (a GOAWAY's last stream id)."""
        return int(_lib.nghttp2_session_get_last_proc_stream_id(self._session))

    def send_window(self, sid: int) -> int:
        """The client's window for stream `sid` (bytes the edge may send it now, connection aside)."""
        return int(_lib.nghttp2_session_get_stream_remote_window_size(self._session, sid))

    def _check(self, function: str, code: int) -> None:
        if code < 0:
            raise SessionError(function, code)

    # -- libnghttp2's callbacks (exceptions become a failed callback: the connection ends) --------

    def _on_begin_headers(self, session: int, frame: int, user: int) -> int:
        self._fields = []
        self._fields_size = 0
        return 0

    def _on_header(self, session: int, frame: int, name: bytes, namelen: int, value: bytes, valuelen: int,
                   flags: int, user: int) -> int:  # fmt: skip
        size = self._fields_size = self._fields_size + namelen + valuelen + _ENTRY_OVERHEAD
        if size > self.max_header_list_size:
            self.events.append((OVERSIZED, _frame_at(frame).stream_id))
            return _ERR_PAUSE
        if len(value) != valuelen or len(name) != namelen:  # a NUL inside: RFC 9113 §8.2.1 forbids it
            return _ERR_TEMPORAL_CALLBACK_FAILURE
        self._fields.append((name, value))
        return 0

    def _on_invalid_header(self, session: int, frame: int, name: bytes, namelen: int, value: bytes, valuelen: int,
                           flags: int, user: int) -> int:  # fmt: skip
        """A regular field libnghttp2 would drop (a name or value with characters RFC 9113 §8.2.1
        forbids): the request is malformed, its stream reset with PROTOCOL_ERROR (§8.1.1)."""
        return _ERR_TEMPORAL_CALLBACK_FAILURE

    def _on_frame_recv(self, session: int, frame: int, user: int) -> int:
        try:
            head = _frame_at(frame)
            kind = head.type
            if kind == _DATA:
                if head.flags & _FLAG_END_STREAM:
                    self.events.append((END, head.stream_id))
            elif kind == _HEADERS:
                cat = head.cat
                if cat == _HCAT_REQUEST:
                    self.events.append((REQUEST, head.stream_id, self._fields, bool(head.flags & _FLAG_END_STREAM)))
                elif cat == _HCAT_HEADERS:  # trailers: they end the request's body (their fields are dropped)
                    self.events.append((END, head.stream_id))
            elif kind == _RST_STREAM:
                self.events.append((RESET, head.stream_id))
            elif kind == _GOAWAY:
                self.events.append((GOAWAY, 0))
        except Exception:  # a bug here must end the connection, not pass silently
            return _ERR_CALLBACK_FAILURE
        return 0

    def _on_data_chunk(self, session: int, flags: int, sid: int, data: int, length: int, user: int) -> int:
        self.events.append((DATA, sid, _string_at(data, length)))
        return 0

    def _on_stream_close(self, session: int, sid: int, code: int, user: int) -> int:
        self.events.append((CLOSED, sid, code))
        return 0

    def _on_error(self, session: int, lib_code: int, message: int, length: int, user: int) -> int:
        self.error = _string_at(message, length).decode("utf-8", "replace")
        return 0

    def _read(self, session: int, sid: int, buf: int, length: int, flags: ctypes._Pointer[ctypes.c_uint32],
              source: int, user: int) -> int:  # fmt: skip
        try:
            taken = self._source.take(sid, length)
            if taken is None:
                return _ERR_DEFERRED
            data, last, trailers = taken
            if data:
                _memmove(buf, data, len(data))
            if last:
                if trailers:
                    flags[0] = _DATA_FLAG_EOF | _DATA_FLAG_NO_END_STREAM
                    nva = _nva(trailers)
                    self._check("nghttp2_submit_trailer", _lib.nghttp2_submit_trailer(session, sid, nva, len(trailers)))
                else:
                    flags[0] = _DATA_FLAG_EOF
            return len(data)
        except Exception as exc:  # a failed read resets this stream (INTERNAL_ERROR) only
            self.error = repr(exc)
            return _ERR_TEMPORAL_CALLBACK_FAILURE
