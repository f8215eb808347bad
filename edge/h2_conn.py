"""The asyncio side of HTTP/2: the adapter around `edge.h2_core.H2Core`, and the listener's
choice of protocol per connection (ALPN on TLS, the prior-knowledge preface on plain h2c).

`H2Protocol` turns the transport's callbacks into events for its core and performs the
actions the core asks for (writes, closing, one timer, a reach task per stream waiting for
its VM). It decides nothing itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from .adapter import CoreAdapter, client_address
from .h2_core import H2Core
from .h2_guard import PREFACE
from .h2_stream import H2Stream
from .http1 import EdgeProtocol, make_protocol_factory
from .proxy_context import ProxyContext
from .reach import reach


class H2Protocol(CoreAdapter):
    """One HTTP/2 client connection: its transport, its timer, its reach tasks, and its core."""

    core: H2Core

    def __init__(self, ctx: ProxyContext, forwarded_proto: bytes) -> None:
        super().__init__()
        self._ctx = ctx
        self.core = H2Core(ctx, forwarded_proto, self, self._loop.time)
        self._reaching: dict[H2Stream, asyncio.Task[None]] = {}

    # -- the transport's callbacks, as events (the rest in edge.adapter) ------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.core.connected(client_address(transport), self.transport.can_write_eof())

    def data_received(self, data: bytes) -> None:
        self.core.client_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.core.client_lost()
        for task in self._reaching.values():
            task.cancel()
        self._reaching.clear()

    # -- the core's actions (closing and the timer in edge.adapter) -----------------------

    def send_client(self, data: bytes) -> None:
        self.transport.write(data)

    def flush_soon(self) -> None:
        self._loop.call_soon(self.core.flush_now)

    def reach(self, stream: H2Stream) -> None:
        self._reaching[stream] = self._loop.create_task(self._reach(stream))

    async def _reach(self, stream: H2Stream) -> None:
        try:
            await reach(self._ctx, stream.ex, stream)
        finally:
            if self._reaching.get(stream) is asyncio.current_task():
                del self._reaching[stream]

    def cancel_reach(self, stream: H2Stream) -> None:
        task = self._reaching.get(stream)
        if task is not None and task is not asyncio.current_task():
            del self._reaching[stream]
            task.cancel()


class _Chooser(asyncio.Protocol):
    """A new connection's first moments: which protocol serves it, then out of the way."""

    def __init__(self, ctx: ProxyContext, proto: bytes, h2c: bool) -> None:
        self._ctx = ctx
        self._proto = proto
        self._h2c = h2c
        self._seen = b""
        self._transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self._hand_over(ssl_object.selected_alpn_protocol() == "h2", b"")
        elif not self._h2c:
            self._hand_over(False, b"")

    def data_received(self, data: bytes) -> None:
        """Plain h2c: a connection that starts with the HTTP/2 preface is HTTP/2."""
        seen = self._seen = self._seen + data
        if len(seen) >= len(PREFACE) or not PREFACE.startswith(seen):
            self._hand_over(seen.startswith(PREFACE), seen)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        pass  # left before a protocol was chosen: nothing was counted yet

    def _hand_over(self, h2: bool, seen: bytes) -> None:
        protocol: asyncio.Protocol = H2Protocol(self._ctx, self._proto) if h2 else EdgeProtocol(self._ctx, self._proto)
        transport = self._transport
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if seen and not transport.is_closing():
            protocol.data_received(seen)


def make_listener_factory(
    ctx: ProxyContext, tls: bool, forwarded_proto: str | None = None
) -> Callable[[], asyncio.Protocol]:
    """The listener's protocol factory: HTTP/1.1 alone (as `make_protocol_factory`) unless [http2]
    offers h2 on this listener (ALPN over TLS, or prior-knowledge h2c on a plain one)."""
    s = ctx.settings.http2
    h2c = s.h2c and not tls
    if not (s.enabled and tls) and not h2c:
        return make_protocol_factory(ctx, forwarded_proto)
    proto = (forwarded_proto or ctx.settings.forwarded_proto).encode("ascii")

    def factory() -> asyncio.Protocol:
        return _Chooser(ctx, proto, h2c)

    return factory
