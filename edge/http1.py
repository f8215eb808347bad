"""The client side of the edge: the asyncio adapter around each connection's sans-IO core.

`EdgeProtocol` turns the transport's callbacks into events for its
`edge.connection_core.ConnectionCore` and performs the actions the core asks for: writes,
pausing and resuming reads, closing, one timer, taking a pooled upstream, and reaching a new
one (`edge.reach`, a task). It decides nothing itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from .connection_core import CONNECTION_MOVES, ConnectionCore, ConnectionState
from .exchange import Exchange
from .proxy_context import ProxyContext
from .reach import reach

__all__ = ["CONNECTION_MOVES", "ConnectionState", "EdgeProtocol", "make_protocol_factory"]


class EdgeProtocol(asyncio.Protocol):
    """One client connection: its transport, its timer, its reaching task, and its core."""

    transport: asyncio.Transport

    def __init__(self, ctx: ProxyContext, forwarded_proto: bytes) -> None:
        self._ctx = ctx
        self._loop = asyncio.get_running_loop()
        self.core = ConnectionCore(ctx, forwarded_proto, self, self._loop.time)
        # Reads go straight to the core: the transport takes `data_received` from this instance
        # when it is made (after this), so a read costs one Python call less.
        self.data_received = self.core.client_data  # type: ignore[method-assign]
        self._timer: asyncio.TimerHandle | None = None
        self._reaching: asyncio.Task[None] | None = None
        self.send_client: Callable[[bytes], object] = _not_connected
        self.take_pooled = ctx.pool.acquire  # the pool's own method: one call less per request

    # -- the transport's callbacks, as events ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.send_client = self.transport.write
        peer = transport.get_extra_info("peername")
        client = str(peer[0]).encode("ascii", "replace") if isinstance(peer, tuple) and peer else b"unknown"
        self.core.connected(client, self.transport.can_write_eof())

    def data_received(self, data: bytes) -> None:
        self.core.client_data(data)

    def eof_received(self) -> bool:
        # Like nginx, a client's FIN is taken as leaving (browsers never half-close): held
        # and in-flight requests are dropped and their upstreams closed by connection_lost.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.core.client_lost()

    def pause_writing(self) -> None:
        self.core.client_write_paused()

    def resume_writing(self) -> None:
        self.core.client_write_resumed()

    def drain(self) -> None:
        """The edge is stopping: close now when between requests, else once they are answered."""
        self.core.drain()

    def abort(self) -> None:
        self.transport.abort()

    # -- the core's actions ----------------------------------------------------------------

    def pause_client(self) -> None:
        self.transport.pause_reading()

    def resume_client(self) -> None:
        self.transport.resume_reading()

    def half_close_client(self) -> None:
        self.transport.write_eof()

    def close_client(self) -> None:
        self.transport.close()

    def abort_client(self) -> None:
        self.transport.abort()

    def set_timer(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(at, self._timer_fired)

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timer_fired(self) -> None:
        self._timer = None
        self.core.timer_fired()

    def reach(self, ex: Exchange) -> None:
        self._reaching = self._loop.create_task(self._reach(ex))

    async def _reach(self, ex: Exchange) -> None:
        try:
            await reach(self._ctx, ex, self.core)
        finally:
            if self._reaching is asyncio.current_task():
                self._reaching = None

    def cancel_reach(self) -> None:
        task = self._reaching
        # Not from inside the task itself: it is delivering its outcome, and ends with it.
        if task is not None and task is not asyncio.current_task():
            self._reaching = None
            task.cancel()

    def advance_soon(self) -> None:
        self._loop.call_soon(self.core.advance)


def _not_connected(data: bytes) -> None:
    raise RuntimeError("the client connection is not made yet")


def make_protocol_factory(ctx: ProxyContext, forwarded_proto: str | None = None) -> Callable[[], asyncio.Protocol]:
    """For `loop.create_server(factory, host, port, ssl=...)`; one protocol per connection.

    `forwarded_proto` overrides the settings' X-Forwarded-Proto for this listener.
    """
    proto = (forwarded_proto or ctx.settings.forwarded_proto).encode("ascii")

    def factory() -> asyncio.Protocol:
        return EdgeProtocol(ctx, proto)

    return factory
