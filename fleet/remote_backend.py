"""The edge worker's VM backend: routes from the catalog, wakes by the VM's host, guests reached directly or tunnelled.

It is what `edge.http1` sees as its VmBackend, so the data plane is the same code as in
`mvm serve`. On the VM's own machine the upstream socket is made inside its namespace
(no hop); from another machine it goes through the host's data port. Activity goes to
each VM's host once per second as one batch, with this edge's open streams per VM: the host
counts them as open work (under a lease, so a crashed edge's counts expire), and its idle
reaper sees what the edges see.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import ssl
import time
from collections.abc import Mapping
from pathlib import Path

from vmm.errors import NotFound
from vmm.jsonlog import log
from vmm.model import VmRecord, VmState
from vmm.network import netns

from . import upstream_broker
from .data_port import open_tunnel
from .host_client import HostClient
from .host_sync import HostAddress
from .routes import RouteTable

ACTIVITY_EVERY = 1.0  # seconds between activity batches to each host
OPEN_LEASE = 5 * ACTIVITY_EVERY  # a host believes an edge's open streams this long without a new batch


class RemoteBackend:
    """VmBackend over the catalog and the hosts' APIs."""

    def __init__(
        self,
        routes: RouteTable,
        hosts: HostClient,
        secret: str,
        direct: bool = True,
        tls: ssl.SSLContext | None = None,
        broker: Path | None = None,
    ) -> None:
        self.routes = routes
        self.hosts = hosts
        self.secret = secret
        self.tls = tls  # the edge's cluster TLS context for data-port tunnels (None: plaintext, loopback only)
        self.direct = direct  # reach guests on this machine without a tunnel (False: always tunnel)
        self.broker = broker  # in `mvm serve`: the host's upstream broker, which enters namespaces for us
        self.open_streams: Mapping[str, int] = {}
        self.edge_id = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"  # reports' author, per process
        self._activity: dict[str, float] = {}
        self._reported_open: set[str] = set()  # hosts whose last batch had open streams: they hear when those end
        self._flusher: asyncio.Task[None] | None = None

    def start(self, open_streams: Mapping[str, int]) -> None:
        self.open_streams = open_streams
        self._flusher = asyncio.create_task(self._flush_forever())

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush_activity()

    def lookup(self, vm_id: str) -> VmRecord | None:
        return self.routes.record(vm_id)

    async def ensure_running(self, vm_id: str) -> bool:
        """Ask the VM's host to wake it; the host shares one wake among all edges asking."""
        placed = self.routes.placed(vm_id)
        if placed is not None and placed.rec.state is VmState.RUNNING and self.routes.host_up(placed.host_id):
            return False
        return await self._wake(vm_id)

    async def confirm_running(self, vm_id: str) -> bool:
        """The guest could not be reached although the routes say it runs: ask its host, which
        knows (and wakes it if it was suspended a moment ago, before this edge heard)."""
        return await self._wake(vm_id)

    async def _wake(self, vm_id: str) -> bool:
        """POST wake to the VM's host; True when the VM's generation moved (it was woken)."""
        placed = self.routes.placed(vm_id) or await self.routes.reload(vm_id)
        if placed is None:
            raise NotFound(f"VM {vm_id!r} does not exist")
        if not self.routes.host_up(placed.host_id):
            await self.routes.refresh_hosts()  # before a 503, make sure the news is not just late
        host = self.routes.reachable_host(placed)
        before = placed.rec.generation
        woke = await self.hosts.call(host.id, host.address, "POST", f"/v1/vms/{vm_id}/wake")
        generation = int(woke.get("generation", before))  # a host from before generations sends none
        self.routes.set_state(vm_id, VmState(woke["state"]), float(woke["state_changed_at"]), generation)
        return generation != before

    async def open_upstream(self, vm_id: str, port: int, timeout: float) -> socket.socket:
        if self.direct and self.broker is not None:
            with contextlib.suppress(upstream_broker.NotHere):  # not this machine's VM: tunnel to its host
                return await upstream_broker.ask(self.broker, vm_id, port, timeout)
        elif self.direct and netns.exists(vm_id):
            return await netns.connect_guest(vm_id, port, timeout)
        placed = self.routes.placed(vm_id)
        host = self.routes.host(placed.host_id) if placed is not None else None
        if host is None:
            raise NotFound(f"VM {vm_id!r} has no host")
        return await open_tunnel(HostAddress.parse(host.address).data, self.secret, vm_id, port, timeout, self.tls)

    def touch(self, vm_id: str, at: float | None = None) -> None:
        self._activity[vm_id] = time.time() if at is None else at

    async def flush_activity(self) -> None:
        """One batch per host: what this edge saw since the last one, and its open streams there.

        A host that had open streams from this edge gets a batch when they are gone too, so it
        does not wait for the lease to end them.
        """
        now = time.time()
        open_by_host: dict[str, dict[str, int]] = {}
        for vm_id, n in self.open_streams.items():
            self._activity[vm_id] = now
            placed = self.routes.placed(vm_id)
            if placed is not None:
                open_by_host.setdefault(placed.host_id, {})[vm_id] = n
        pending, self._activity = self._activity, {}
        by_host: dict[str, dict[str, float]] = {host_id: {} for host_id in self._reported_open | set(open_by_host)}
        for vm_id, at in pending.items():
            placed = self.routes.placed(vm_id)
            if placed is not None:
                by_host.setdefault(placed.host_id, {})[vm_id] = at
        self._reported_open = set(open_by_host)
        for host_id, batch in by_host.items():
            host = self.routes.host(host_id)
            if host is None or not self.routes.host_up(host_id):
                continue
            body = {"vms": batch, "open": open_by_host.get(host_id, {}), "edge": self.edge_id, "lease": OPEN_LEASE}
            try:
                await self.hosts.call(host_id, host.address, "POST", "/v1/host/activity", body)
            except Exception as exc:  # a lost batch only makes an idle suspend come sooner
                log.event("edge.activity_failed", level="warning", host=host_id, error=str(exc))

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(ACTIVITY_EVERY)
            await self.flush_activity()
