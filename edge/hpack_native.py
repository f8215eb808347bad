"""HPACK in C for the edge's h2c guest connections (python-hyper's h2): libnghttp2's inflater and
deflater through ctypes. (Toward clients the whole session is libnghttp2's: edge.nghttp2_session.)

python-hyper's hpack decodes Huffman strings in pure Python, and a never-indexed Authorization
value (the Bearer token) is decoded again in every request: that was a third of h2's CPU per
request. libnghttp2 is the HPACK of curl and nghttp2 (maintained, fuzzed by OSS-Fuzz, Debian's
libnghttp2-14); ctypes is in the standard library, so nothing is built. `NativeDecoder` and
`NativeEncoder` stand in for hpack's Decoder and Encoder on an h2 `H2Connection`
(`use_native_hpack`) and keep their contract: a bad block raises HPACKDecodingError (h2: a
connection error), a header list past `max_header_list_size` raises OversizedHeaderListError as
soon as the decoded fields pass it (the HPACK bomb), the dynamic table never grows past what our
SETTINGS allow, and a never-indexed field stays never-indexed both ways. One bound is
libnghttp2's own: a single name or value over 64 KiB is refused (a decoding error, or an
oversized list where it passes `max_header_list_size`).
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from hpack.exceptions import HPACKDecodingError, HPACKError, OversizedHeaderListError
from hpack.hpack import decode_integer
from hpack.struct import HeaderTuple, NeverIndexedHeaderTuple

if TYPE_CHECKING:
    from h2.connection import H2Connection
    from hpack.hpack import Decoder, Encoder

LIBRARY = "libnghttp2.so.14"  # Debian 12's libnghttp2-14 (scripts/install.sh installs it)
DEFAULT_TABLE_SIZE = 4096  # SETTINGS_HEADER_TABLE_SIZE's initial value (RFC 9113 §6.5.2)
DEFAULT_MAX_HEADER_LIST_SIZE = 2**16  # hpack's default: h2 sets its own at once
_ENTRY_OVERHEAD = 32  # a field's size counts its name, its value and 32 (RFC 7541 §4.1)
_NV_FLAG_NO_INDEX = 0x01
_INFLATE_FINAL = 0x01
_INFLATE_EMIT = 0x02


class _InNv(ctypes.Structure):
    """nghttp2_nv as the inflater fills it (pointers into its own buffers, read at once)."""

    _fields_ = (
        ("name", ctypes.POINTER(ctypes.c_char)),
        ("value", ctypes.POINTER(ctypes.c_char)),
        ("namelen", ctypes.c_size_t),
        ("valuelen", ctypes.c_size_t),
        ("flags", ctypes.c_uint8),
    )


class _OutNv(ctypes.Structure):
    """nghttp2_nv as the deflater reads it (pointers into Python bytes kept alive by the array)."""

    _fields_ = (
        ("name", ctypes.c_char_p),
        ("value", ctypes.c_char_p),
        ("namelen", ctypes.c_size_t),
        ("valuelen", ctypes.c_size_t),
        ("flags", ctypes.c_uint8),
    )


def _load(name: str = LIBRARY) -> ctypes.PyDLL:
    """The library, its functions typed; the GIL stays held in calls (they are short, and the
    encoder's scratch buffer is shared). Missing, the edge does not start."""
    try:
        lib = ctypes.PyDLL(name)
    except OSError as exc:
        raise ImportError(
            f"{name} is missing (Debian's libnghttp2-14; scripts/install.sh installs it): "
            f"the edge's HTTP/2 runs in it ({exc})"
        ) from exc
    vp, size, ssize, cint = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_ssize_t, ctypes.c_int
    signatures: dict[str, tuple[type | None, list[type] | None]] = {
        "nghttp2_hd_inflate_new": (cint, [ctypes.POINTER(vp)]),
        "nghttp2_hd_inflate_del": (None, [vp]),
        # Called once per field, with ctypes objects of the right C types (NativeDecoder): declared
        # argument types would be checked and converted in every call, a third of its cost.
        "nghttp2_hd_inflate_hd2": (ssize, None),
        "nghttp2_hd_inflate_end_headers": (cint, [vp]),
        "nghttp2_hd_inflate_change_table_size": (cint, [vp, size]),
        "nghttp2_hd_inflate_get_max_dynamic_table_size": (size, [vp]),
        "nghttp2_hd_deflate_new": (cint, [ctypes.POINTER(vp), size]),
        "nghttp2_hd_deflate_del": (None, [vp]),
        "nghttp2_hd_deflate_bound": (size, [vp, ctypes.POINTER(_OutNv), size]),
        "nghttp2_hd_deflate_hd": (ssize, [vp, ctypes.c_char_p, size, ctypes.POINTER(_OutNv), size]),
        "nghttp2_hd_deflate_change_table_size": (cint, [vp, size]),
        "nghttp2_hd_deflate_get_max_dynamic_table_size": (size, [vp]),
        "nghttp2_strerror": (ctypes.c_char_p, [cint]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


_lib = _load()
_inflate = _lib.nghttp2_hd_inflate_hd2
_end_headers = _lib.nghttp2_hd_inflate_end_headers
_bound = _lib.nghttp2_hd_deflate_bound
_deflate = _lib.nghttp2_hd_deflate_hd
_address = ctypes.c_void_p.from_buffer


def shared_library() -> ctypes.PyDLL:
    """The loaded libnghttp2, for the HTTP/2 session in C (edge.nghttp2_session) to type its own functions on."""
    return _lib


def _why(code: int) -> str:
    return f"libnghttp2: {_lib.nghttp2_strerror(code).decode()}"


def _oversized(limit: int) -> OversizedHeaderListError:
    """hpack's error for a header list past `max_header_list_size` (the HPACK bomb), its words too."""
    return OversizedHeaderListError(f"A header list larger than {limit} has been received")


def _declared_size(block: bytes, pos: int) -> int:
    """The size the literal field at `pos` says it has (its literal strings' lengths and 32; 0 for
    an indexed field or a bad one), read after libnghttp2 refused it: it refuses a name or value
    over 64 KiB as it reads the length, which hpack would have counted against the list's limit."""
    try:
        while (block[pos] & 0xE0) == 0x20:  # table size updates before it
            pos += decode_integer(block[pos:], 5)[1]
        first = block[pos]
        if first & 0x80:
            return 0
        index, used = decode_integer(block[pos:], 6 if first & 0x40 else 4)
        pos += used
        size = _ENTRY_OVERHEAD
        if index == 0:  # a literal name before the value
            length, used = decode_integer(block[pos:], 7)
            size += length
            pos += used + length
        return size + decode_integer(block[pos:], 7)[0]
    except (IndexError, HPACKDecodingError):
        return 0


class NativeDecoder:
    """hpack's Decoder, as h2 uses it, over an nghttp2_hd_inflater."""

    __slots__ = (
        "__weakref__", "_at", "_broken", "_flags", "_flags_ref", "_inflater", "_left", "_max_allowed", "_nv",
        "_nv_ref", "max_header_list_size",
    )  # fmt: skip

    def __init__(self, max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
        inflater = ctypes.c_void_p()
        if _lib.nghttp2_hd_inflate_new(ctypes.byref(inflater)) != 0:
            raise MemoryError("nghttp2_hd_inflate_new")
        weakref.finalize(self, _lib.nghttp2_hd_inflate_del, inflater)
        self._inflater = inflater
        self._nv = _InNv()
        self._flags = ctypes.c_int()
        # nghttp2_hd_inflate_hd2's arguments as its C types: (inflater, nv_out, inflate_flags, in, inlen, 1)
        self._nv_ref, self._flags_ref = ctypes.byref(self._nv), ctypes.byref(self._flags)
        self._at, self._left = ctypes.c_void_p(), ctypes.c_size_t()
        self._broken = False  # a block failed part-way: the table is lost, as is the connection
        self._max_allowed = DEFAULT_TABLE_SIZE
        self.max_header_list_size = max_header_list_size

    @property
    def max_allowed_table_size(self) -> int:
        """Our SETTINGS_HEADER_TABLE_SIZE (acknowledged): a larger table size update is an error."""
        return self._max_allowed

    @max_allowed_table_size.setter
    def max_allowed_table_size(self, value: int) -> None:
        if _lib.nghttp2_hd_inflate_change_table_size(self._inflater, value) != 0:
            raise HPACKDecodingError("the table size changed in the middle of a header block")
        self._max_allowed = value

    @property
    def header_table_size(self) -> int:
        """The dynamic table's size limit now (the encoder's last table size update)."""
        return int(_lib.nghttp2_hd_inflate_get_max_dynamic_table_size(self._inflater))

    def decode(self, data: bytes, raw: bool = False) -> list[HeaderTuple]:
        """The fields of one whole header block, in order (bytes if `raw`, else UTF-8 text)."""
        if self._broken:
            raise HPACKDecodingError("an earlier header block failed: the compression context is lost")
        block = bytes(data)
        inflater, nv, flags, nv_ref, flags_ref = self._inflater, self._nv, self._flags, self._nv_ref, self._flags_ref
        at, left = self._at, self._left
        at.value = _address(ctypes.c_char_p(block)).value  # the bytes' own buffer, not a copy
        pos, end = 0, len(block)
        limit = self.max_header_list_size
        size = 0
        headers: list[HeaderTuple] = []
        while True:
            left.value = end - pos
            took = _inflate(inflater, nv_ref, flags_ref, at, left, 1)
            if took < 0:
                self._broken = True
                if size + _declared_size(block, pos) > limit:  # libnghttp2 refused a field over 64 KiB
                    raise _oversized(limit)
                raise HPACKDecodingError(_why(took))
            pos += took
            at.value += took
            done = flags.value
            if done & _INFLATE_EMIT:
                namelen, valuelen = nv.namelen, nv.valuelen
                size += namelen + valuelen + _ENTRY_OVERHEAD
                if size > limit:
                    self._broken = True
                    raise _oversized(limit)
                kind = NeverIndexedHeaderTuple if nv.flags & _NV_FLAG_NO_INDEX else HeaderTuple
                headers.append(tuple.__new__(kind, (nv.name[:namelen], nv.value[:valuelen])))
            if done & _INFLATE_FINAL:
                break
        _end_headers(inflater)
        if raw:
            return headers
        try:
            return [h.__class__(h[0].decode(), h[1].decode()) for h in headers]
        except UnicodeDecodeError as exc:
            raise HPACKDecodingError("Unable to decode headers as UTF-8") from exc


class _Scratch:
    """The deflater's output buffer, one for the process (calls hold the GIL), grown as needed."""

    buffer = ctypes.create_string_buffer(16384)


def _bytes(text: bytes | str) -> bytes:
    return text if type(text) is bytes else str(text).encode()


class NativeEncoder:
    """hpack's Encoder, as h2 uses it, over an nghttp2_hd_deflater."""

    __slots__ = ("__weakref__", "_deflater")

    def __init__(self) -> None:
        deflater = ctypes.c_void_p()
        if _lib.nghttp2_hd_deflate_new(ctypes.byref(deflater), DEFAULT_TABLE_SIZE) != 0:
            raise MemoryError("nghttp2_hd_deflate_new")
        weakref.finalize(self, _lib.nghttp2_hd_deflate_del, deflater)
        self._deflater = deflater

    @property
    def header_table_size(self) -> int:
        """The table size in use: the peer's SETTINGS_HEADER_TABLE_SIZE, at most 4096 (our memory)."""
        return int(_lib.nghttp2_hd_deflate_get_max_dynamic_table_size(self._deflater))

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE changed: the next block starts with an update."""
        if _lib.nghttp2_hd_deflate_change_table_size(self._deflater, value) != 0:
            raise MemoryError("nghttp2_hd_deflate_change_table_size")

    def encode(self, headers: Iterable[tuple[bytes | str, ...]]) -> bytes:
        """One header block. A NeverIndexedHeaderTuple, or a third item that is true, is sent
        never-indexed (RFC 7541 §7.1.3); libnghttp2 also keeps Authorization and short cookies so."""
        fields = list(headers)
        count = len(fields)
        nva = (_OutNv * count)()
        for nv, field in zip(nva, fields, strict=True):
            name, value = _bytes(field[0]), _bytes(field[1])
            nv.name, nv.namelen = name, len(name)
            nv.value, nv.valuelen = value, len(value)
            if (not field.indexable) if isinstance(field, HeaderTuple) else (len(field) > 2 and field[2]):
                nv.flags = _NV_FLAG_NO_INDEX
        deflater = self._deflater
        need = _bound(deflater, nva, count)
        if need > len(_Scratch.buffer):
            _Scratch.buffer = ctypes.create_string_buffer(need)
        buffer = _Scratch.buffer
        wrote = _deflate(deflater, buffer, need, nva, count)
        if wrote < 0:
            raise HPACKError(_why(wrote))
        return cast(bytes, buffer[:wrote])  # a c_char array's slice is bytes


def use_native_hpack(conn: H2Connection) -> H2Connection:
    """Put libnghttp2's HPACK on an h2 connection just made (before any header block)."""
    conn.decoder = cast("Decoder", NativeDecoder(conn.decoder.max_header_list_size))
    conn.encoder = cast("Encoder", NativeEncoder())
    return conn
