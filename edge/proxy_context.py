"""Everything the per-connection proxy protocol shares: collaborators, knobs, live counts."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field

from .backend import VmBackend
from .hosts import HostRouter
from .metrics import Metrics
from .tokens import TokenService
from .upstream import UpstreamPool


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Limits of the data plane; times in seconds."""

    connect_timeout: float = 5.0
    read_timeout: float = 300.0  # from request sent to response head
    wake_timeout: float = 30.0
    max_held_per_vm: int = 256
    retry_after: int = 2
    forwarded_proto: str = "https"
    idle_timeout: float = 75.0  # a client between requests, sending a head, or pausing a body
    max_head_size: int = 64 * 1024
    linger_timeout: float = 5.0  # reading a body we no longer need before closing
    # Clients (other proxies) whose X-Forwarded-For is appended to; everyone else's is replaced.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def trusts(self, client: bytes) -> bool:
        if not self.trusted_proxies:
            return False
        try:
            address = ipaddress.ip_address(client.decode("ascii"))
        except ValueError:
            return False
        return any(address in network for network in self.trusted_proxies)


@dataclass(eq=False)
class ProxyContext:
    """Shared by every client connection of one edge process.

    `open_streams[vm]` counts requests and tunnels in progress (the idle reaper keeps such
    VMs awake); `held[vm]` counts requests waiting for that VM to wake.
    """

    backend: VmBackend
    router: HostRouter
    tokens: TokenService
    metrics: Metrics
    pool: UpstreamPool
    control_socket: str
    settings: ProxySettings = field(default_factory=ProxySettings)
    control_auth: bytes = b""  # "Bearer <admin key>": scoped agent requests reach the control API with it
    open_streams: dict[str, int] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    _wakes: dict[str, asyncio.Task[bool]] = field(default_factory=dict, init=False, repr=False)

    def wake(self, vm_id: str) -> asyncio.Task[bool]:
        """One ensure_running per VM at a time, shared by every request held for it."""
        task = self._wakes.get(vm_id)
        if task is None:
            loop = asyncio.get_running_loop()
            started = loop.time()
            task = loop.create_task(self.backend.ensure_running(vm_id))
            self._wakes[vm_id] = task
            task.add_done_callback(lambda t: self._wake_done(vm_id, t, loop.time() - started))
        return task

    def _wake_done(self, vm_id: str, task: asyncio.Task[bool], seconds: float) -> None:
        """Counts each real wake once (not once per held request), however its waiters fared."""
        if self._wakes.get(vm_id) is task:
            del self._wakes[vm_id]
        if task.cancelled():
            return
        failed = task.exception() is not None  # also marks it seen for waiters that gave up
        if failed or task.result():
            self.metrics.wake(seconds, not failed)

    def stream_opened(self, vm_id: str) -> None:
        self.open_streams[vm_id] = self.open_streams.get(vm_id, 0) + 1

    def stream_closed(self, vm_id: str) -> None:
        left = self.open_streams[vm_id] - 1
        if left:
            self.open_streams[vm_id] = left
        else:
            del self.open_streams[vm_id]

