"""The request head the edge sends to a VM: hop-by-hop headers out, X-Forwarded-* in.

Headers are sorted as the parser delivers them: most are copied through untouched, the few
the edge decides on (Host, the token carriers, connection management, framing) are kept
aside, so one pass and one join build the forwarded head.
"""

from __future__ import annotations

import enum

from .tokens import strip_token_from_target

_PLAIN = 0
_DROP = 1
_HOST = 2
_AUTHORIZATION = 3
_COOKIE = 4
_CONNECTION = 5
_UPGRADE = 6
_FORWARDED_FOR = 7
_CONTENT_LENGTH = 8
_TRANSFER_ENCODING = 9
_REFERER = 10
_MVM_PORT = 11
_WS_PROTOCOL = 12

_KINDS = {
    b"host": _HOST,
    b"authorization": _AUTHORIZATION,
    b"cookie": _COOKIE,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
    b"x-forwarded-for": _FORWARDED_FOR,
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"referer": _REFERER,
    b"x-mvm-port": _MVM_PORT,  # the edge's port selection (edge/port_select.py): never forwarded
    b"sec-websocket-protocol": _WS_PROTOCOL,  # forwarded without the edge's mvm.port.N entry
    # Hop-by-hop (RFC 9110 7.6.1) or set by the edge itself.
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"proxy-authorization": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"x-forwarded-proto": _DROP,
    b"x-forwarded-host": _DROP,
    # The edge is the outermost proxy: what a client claims about its own address goes.
    b"forwarded": _DROP,
    b"x-real-ip": _DROP,
}
# Connection options that name no header of their own, and framing no client may have dropped.
_KEEP = frozenset((b"keep-alive", b"close", b"upgrade", b"content-length"))


class _AsSent(enum.Enum):
    AS_SENT = 0


AS_SENT = _AsSent.AS_SENT  # render's default: the client's own Sec-WebSocket-Protocol


class RequestHead:
    """One client request's headers, collected by `add` while the parser runs (llhttp calls it
    for each header field), with their count and size for the connection's limits."""

    __slots__ = (
        "_connection",
        "_plain",
        "authorization",
        "content_length",
        "cookie",
        "fields",
        "forwarded_for",
        "host",
        "hosts",
        "mvm_port",
        "referer",
        "size",
        "transfer_encoding",
        "upgrade",
        "ws_protocol",
    )

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Empty, for the next request of the connection (one object serves them all)."""
        self.size = 0  # bytes of the header fields so far, counted as they would be sent
        self.fields = 0
        self._plain: list[bytes] = []
        self._connection: bytes | None = None
        self.host: bytes | None = None
        self.hosts = 0
        self.authorization: bytes | None = None
        self.cookie: bytes | None = None
        self.forwarded_for: bytes | None = None
        self.content_length: bytes | None = None
        self.transfer_encoding: bytes | None = None
        self.upgrade: bytes | None = None
        self.referer: bytes | None = None
        self.mvm_port: bytes | None = None
        self.ws_protocol: bytes | None = None

    def add(self, name: bytes, value: bytes) -> None:
        self.size += len(name) + len(value) + 4
        self.fields += 1
        kind = _KINDS.get(name.lower(), _PLAIN)
        if kind == _PLAIN:
            self._plain += (name, b": ", value, b"\r\n")
        elif kind == _HOST:
            self.host = value
            self.hosts += 1
        elif kind == _AUTHORIZATION:
            if self.authorization is None:
                self.authorization = value
            else:  # a second one goes through as it came; only the first can carry our token
                self._plain += (name, b": ", value, b"\r\n")
        elif kind == _COOKIE:
            self.cookie = value if self.cookie is None else self.cookie + b"; " + value
        elif kind == _CONNECTION:
            self._connection = value if self._connection is None else self._connection + b", " + value
        elif kind == _UPGRADE:
            self.upgrade = value
        elif kind == _FORWARDED_FOR:
            self.forwarded_for = value if self.forwarded_for is None else self.forwarded_for + b", " + value
        elif kind == _CONTENT_LENGTH:
            self.content_length = value
            self._plain += (name, b": ", value, b"\r\n")
        elif kind == _REFERER:
            self.referer = value
        elif kind == _MVM_PORT:
            self.mvm_port = value if self.mvm_port is None else self.mvm_port + b", " + value
        elif kind == _WS_PROTOCOL:
            self.ws_protocol = value if self.ws_protocol is None else self.ws_protocol + b", " + value
        elif kind == _TRANSFER_ENCODING:
            te = self.transfer_encoding
            self.transfer_encoding = value if te is None else te + b", " + value

    def signature(self) -> tuple[object, ...]:
        """Everything the forwarded head is made of: two heads with equal signatures are
        admitted and rendered alike."""
        return (
            self.host, self.hosts, self.authorization, self.cookie, self.forwarded_for, self.content_length,
            self.transfer_encoding, self.upgrade, self.referer, self._connection, tuple(self._plain), self.mvm_port,
            self.ws_protocol,
        )  # fmt: skip

    @property
    def chunked(self) -> bool:
        """The body is chunked (the parser has checked chunked is the final coding)."""
        te = self.transfer_encoding
        return te is not None and te.rpartition(b",")[2].strip().lower() == b"chunked"

    @property
    def has_body(self) -> bool:
        if self.transfer_encoding is not None:
            return True
        cl = self.content_length
        return cl is not None and int(cl) > 0

    def render(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        *,
        keep_authorization: bool,
        cookie: bytes | None,
        upgrade: bool,
        client: bytes,
        proto: bytes,
        trust_forwarded: bool = False,
        subprotocols: bytes | _AsSent | None = AS_SENT,
    ) -> bytes:
        """The head to forward; Host stays as the client sent it, and Sec-WebSocket-Protocol too unless
        `subprotocols` replaces it (None: none). X-Mvm-Port never goes on.

        X-Forwarded-For is the client's address, or, from a trusted proxy, its list plus the client.
        A Referer loses any `token` parameter (a `?token=` page's links would carry it on).
        """
        host = self.host or b""
        plain = self._plain
        if self._connection is not None:
            plain = self._without_connection_options(plain)
        parts = [method, b" ", target, b" HTTP/", version, b"\r\nHost: ", host, b"\r\n", *plain]
        if keep_authorization and self.authorization is not None:
            parts += (b"Authorization: ", self.authorization, b"\r\n")
        if cookie:
            parts += (b"Cookie: ", cookie, b"\r\n")
        if self.referer is not None:
            parts += (b"Referer: ", strip_token_from_target(self.referer), b"\r\n")
        ws_protocol = self.ws_protocol if subprotocols is AS_SENT else subprotocols
        if ws_protocol is not None:
            parts += (b"Sec-WebSocket-Protocol: ", ws_protocol, b"\r\n")
        if self.transfer_encoding is not None:
            parts += (b"Transfer-Encoding: ", self.transfer_encoding, b"\r\n")
        if upgrade and self.upgrade is not None:
            parts += (b"Connection: Upgrade\r\nUpgrade: ", self.upgrade, b"\r\n")
        elif version == b"1.0":
            parts.append(b"Connection: keep-alive\r\n")  # HTTP/1.0 upstreams close otherwise
        xff = self.forwarded_for + b", " + client if trust_forwarded and self.forwarded_for else client
        parts += (b"X-Forwarded-For: ", xff, b"\r\nX-Forwarded-Proto: ", proto)
        parts += (b"\r\nX-Forwarded-Host: ", host, b"\r\n\r\n")
        return b"".join(parts)

    def _without_connection_options(self, plain: list[bytes]) -> list[bytes]:
        """Drop headers named in Connection (e.g. `Connection: close, X-Secret`)."""
        names = {t.strip().lower() for t in (self._connection or b"").split(b",")} - _KEEP
        if not names:
            return plain
        kept: list[bytes] = []
        for i in range(0, len(plain), 4):
            if plain[i].lower() not in names:
                kept += plain[i : i + 4]
        return kept
