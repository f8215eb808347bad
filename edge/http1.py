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

from .adapter import CoreAdapter, client_address
from .connection_core import ConnectionCore
from .exchange import Exchange
from .proxy_context import ProxyContext
from .reach import reach


class EdgeProtocol(CoreAdapter):
    """One client connection: its transport, its timer, its reaching task, and its core."""

    core: ConnectionCore

    def __init__(self, ctx: ProxyContext, forwarded_proto: bytes) -> None:
        super().__init__()
        self._ctx = ctx
        self.core = ConnectionCore(ctx, forwarded_proto, self, self._loop.time)
        # Reads go straight to the core: the transport takes `data_received` from this instance
        # when it is made (after this), so a read costs one Python call less.
        self.data_received = self.core.client_data  # type: ignore[method-assign]
        self._reaching: asyncio.Task[None] | None = None
        self.send_client: Callable[[bytes], object] = _not_connected
        self.take_pooled = ctx.pool.acquire  # the pool's own method: one call less per request

    # -- the transport's callbacks, as events (the rest in edge.adapter) ------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.send_client = self.transport.write
        self.core.connected(client_address(transport), self.transport.can_write_eof())

    def data_received(self, data: bytes) -> None:
        self.core.client_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.core.client_lost()

    # -- the core's actions (closing and the timer in edge.adapter) -----------------------

    def pause_client(self) -> None:
        self.transport.pause_reading()

    def resume_client(self) -> None:
        self.transport.resume_reading()

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
