"""Everything the per-connection proxy protocol shares: collaborators, knobs, live counts."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from dataclasses import dataclass, field
from typing import Protocol

from vmm.open_work import OpenWork, count_down

from .backend import VmBackend
from .h2_settings import Http2Settings
from .hostnames import HostnameRouter
from .memory import BurstTrimmer
from .metrics import Metrics
from .shared_ips import SharedIpTable
from .tokens import TokenService
from .upstream import UpstreamPool


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The data plane's knobs: what [proxy] holds (loaded by mvm.config), times in seconds."""

    connect_timeout: float = 5.0
    read_timeout: float = 300.0  # from request sent to response head
    wake_timeout: float = 30.0
    max_held_per_vm: int = 256
    upstream_keepalive_per_vm: int = 32  # idle guest connections kept per VM
    upstream_keepalive_idle: float = 30.0  # seconds an idle guest connection is kept
    retry_after: int = 2
    forwarded_proto: str = "https"  # not a [proxy] key: from server.tls
    idle_timeout: float = 75.0  # a client between requests, sending a head, or pausing a body
    max_head_size: int = 64 * 1024
    max_headers: int = 100
    body_timeout: float = 300.0  # a whole request body, not counting time the edge paused reading (0: off)
    body_min_rate: int = 0  # bytes/s a body must average once body_rate_grace has passed (0: off)
    body_rate_grace: float = 10.0
    max_connections_per_ip: int = 256  # 0: off; trusted proxies are exempt
    linger_timeout: float = 5.0  # reading a body we no longer need before closing
    # Clients (other proxies) whose X-Forwarded-For is appended to; everyone else's is replaced.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    http2: Http2Settings = field(default_factory=Http2Settings)  # not a [proxy] key: the [http2] section

    def trusts(self, client: bytes) -> bool:
        if not self.trusted_proxies:
            return False
        try:
            address = ipaddress.ip_address(client.decode("ascii"))
        except ValueError:
            return False
        return any(address in network for network in self.trusted_proxies)


class ClientConnection(Protocol):
    """What a draining edge needs of each client connection."""

    def drain(self) -> None:
        """Close now if between requests, else after the requests already received."""

    def abort(self) -> None:
        """Cut the connection (the drain took too long)."""


@dataclass(eq=False)
class ProxyContext:
    """Shared by every client connection of one edge process.

    `open_streams[vm]` counts requests and tunnels in progress: open work that keeps the VM
    awake. In `mvm serve` it is the VM manager's own count (the reaper reads it there); an
    edge worker keeps its own and reports it to each VM's host. `held[vm]` counts requests
    waiting for that VM to wake. Once `wakes_refused` is set (the edge is stopping) a request
    for a VM that is not running gets 503 instead of waking it: the manager may be
    suspending VMs at that very moment.
    """

    backend: VmBackend
    router: HostnameRouter
    tokens: TokenService
    metrics: Metrics
    pool: UpstreamPool
    control_socket: str
    settings: ProxySettings = field(default_factory=ProxySettings)
    control_auth: bytes = b""  # "Bearer <admin key>": scoped agent requests reach the control API with it
    open_streams: OpenWork = field(default_factory=OpenWork)
    held: dict[str, int] = field(default_factory=dict)
    per_ip: dict[bytes, int] = field(default_factory=dict)  # open client connections by client address
    shared_ips: SharedIpTable | None = None  # the same counts of every worker of the set, for the limit
    clients: set[ClientConnection] = field(default_factory=set)
    wakes_refused: bool = False
    trimmer: BurstTrimmer = field(default_factory=BurstTrimmer)  # memory back to the OS after a burst
    _drained: asyncio.Event | None = field(default=None, init=False, repr=False)
    _wakes: dict[str, asyncio.Task[bool]] = field(default_factory=dict, init=False, repr=False)

    def wake(self, vm_id: str, recheck: bool = False) -> asyncio.Task[bool]:
        """One wake per VM at a time, shared by every request held for it: the one wake
        single-flight (the VM manager only serialises its callers). Here because it is what
        every backend needs: one call to the VM's owner per wake, in-process or over the
        network to its host, the wake counted once in the metrics, and a wake that outlives
        the requests that gave up on it. `recheck` asks the VM's owner even if this edge takes
        the VM for running (a connect to it failed); a wake already under way answers that too."""
        task = self._wakes.get(vm_id)
        if task is None:
            loop = asyncio.get_running_loop()
            started = loop.time()
            woken = self.backend.confirm_running(vm_id) if recheck else self.backend.ensure_running(vm_id)
            task = loop.create_task(woken)
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

    def client_opened(self, client: bytes) -> bool:
        """Count a new client connection; False (not counted) when its address has too many,
        here or, with `shared_ips`, on all the workers of this machine together."""
        limit = self.settings.max_connections_per_ip
        n = self.per_ip.get(client, 0)
        if self.shared_ips is not None:
            if not self.shared_ips.opened(client, n, limit, self.settings.trusts):
                return False
        elif limit and n >= limit and not self.settings.trusts(client):
            return False
        self.per_ip[client] = n + 1
        self.metrics.client_connections(1)
        return True

    def client_closed(self, client: bytes) -> None:
        count_down(self.per_ip, client)
        if self.shared_ips is not None:
            self.shared_ips.closed(client, self.per_ip.get(client, 0))
        self.metrics.client_connections(-1)

    def connection_made(self, client: ClientConnection) -> None:
        self.clients.add(client)
        self.trimmer.opened(len(self.clients))
        if self._drained is not None:  # accepted just before the listener closed
            client.drain()

    def connection_lost(self, client: ClientConnection) -> None:
        self.clients.discard(client)
        self.trimmer.closed(len(self.clients))
        if self._drained is not None and not self.clients:
            self._drained.set()

    async def drain(self, timeout: float) -> int:
        """Refuse wakes, close idle clients, give requests in flight `timeout` seconds to end,
        then cut what is left; returns how many connections were cut."""
        self.wakes_refused = True
        drained = self._drained = asyncio.Event()
        for client in list(self.clients):
            client.drain()
        if self.clients:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drained.wait(), timeout)
        left = list(self.clients)
        for client in left:
            client.abort()
        return len(left)

