"""What the asyncio adapters of HTTP/1.1 (`edge.http1`) and HTTP/2 (`edge.h2_conn`) share: the
transport's flow and shutdown callbacks passed to their sans-IO core as events, and the actions
every core asks for of a client connection (close, abort, half-close, one timer)."""

from __future__ import annotations

import asyncio
from typing import Protocol


class AdaptedCore(Protocol):
    """The events a connection core takes from every adapter."""

    def client_write_paused(self) -> None: ...
    def client_write_resumed(self) -> None: ...
    def drain(self) -> None: ...
    def timer_fired(self) -> None: ...


def client_address(transport: asyncio.BaseTransport) -> bytes:
    """The peer's address as the core logs and limits it; b"unknown" when the socket has none."""
    peer = transport.get_extra_info("peername")
    return str(peer[0]).encode("ascii", "replace") if isinstance(peer, tuple) and peer else b"unknown"


class CoreAdapter(asyncio.Protocol):
    """A client connection's transport and its one timer, driven by and reporting to `core`."""

    transport: asyncio.Transport
    core: AdaptedCore

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None

    # -- the transport's callbacks, as events ---------------------------------------------

    def eof_received(self) -> bool:
        # Like nginx, a client's FIN is taken as leaving (browsers never half-close): held
        # and in-flight requests are dropped and their upstreams closed by connection_lost.
        return False

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
