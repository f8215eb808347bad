"""What the sans-IO connection core (`edge.connection_core`) asks of the world: the actions its asyncio
adapter performs (`ConnectionIo`, edge.http1.EdgeProtocol) and those it asks of the upstream connection
its request is sent on (`Upstream`, edge.upstream.UpstreamConn). A playbook test records them instead."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from .exchange import Exchange
from .proxy_context import ClientConnection
from .upstream import Owner, ResponseTracker


class Upstream(Protocol):
    """What the core needs of the connection its exchange is sent on (edge.upstream.UpstreamConn)."""

    owner: Owner | None
    tracker: ResponseTracker
    write_paused: bool

    @property
    def send(self) -> Callable[[bytes], object]: ...
    @property
    def send_parts(self) -> Callable[[Iterable[bytes]], object]: ...

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def finish(self, now: float, reusable: bool) -> None: ...
    def close(self) -> None: ...


class ConnectionIo(ClientConnection, Protocol):
    """The actions the core asks of its adapter (edge.http1.EdgeProtocol)."""

    @property
    def send_client(self) -> Callable[[bytes], object]:
        """Write to the client (the transport's own write, read once when connected)."""

    def pause_client(self) -> None: ...
    def resume_client(self) -> None: ...
    def half_close_client(self) -> None:
        """Send the end (FIN) after what was written, and keep reading."""

    def close_client(self) -> None:
        """Close after what was written."""

    def abort_client(self) -> None: ...
    def set_timer(self, at: float) -> None:
        """Call `timer_fired` at `at` (instead of any timer set before)."""

    def cancel_timer(self) -> None: ...
    def take_pooled(self, key: str, port: int, now: float, generation: int) -> Upstream | None:
        """An idle pooled connection to `port` of VM `key` (CONTROL_KEY: the control API),
        opened in the VM's `generation` and still established, or None."""

    def reach(self, ex: Exchange) -> None:
        """Start reaching `ex`'s upstream (wake its VM if needed, connect); the outcome comes
        back as waiting_for_vm / vm_woken, then upstream_opened, reach_refused, reach_failed
        or reach_crashed."""

    def cancel_reach(self) -> None:
        """Stop reaching (the exchange was answered or the client left); no outcome comes."""

    def advance_soon(self) -> None:
        """Call `advance` soon, not from inside this call: one read can hold many requests."""
