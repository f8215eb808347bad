"""An edge's routing table: which host each VM is on, its state, and which hosts are up.

Read from the catalog at start, then kept current by its change feed (PostgreSQL: LISTEN/
NOTIFY, so a route changed by one edge or host is dropped by every edge at once). The
embedded SQLite catalog has no cross-process feed, so there the table is reloaded every
POLL seconds instead. A host is up while its last heartbeat is younger than down_after;
the edge decides that itself, from the heartbeat time, so no one has to mark hosts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable
from dataclasses import replace
from typing import cast

from fleet.catalog import Catalog, HostRecord, PlacedVm, Unsubscribe
from vmm.errors import NotRunning, VmmError
from vmm.jsonlog import log
from vmm.model import VmRecord, VmState

POLL = 0.1  # seconds between reloads when the catalog has no cross-process feed (SQLite)


class FleetState(enum.StrEnum):
    """States only an edge of a fleet shows, never a VM manager's (vmm.model.VmState)."""

    UNAVAILABLE = "unavailable"  # the VM's host misses heartbeats: its real state is unknown; never stored


class RouteTable:
    """VMs and hosts as the catalog says, in memory: the request path never waits on the catalog."""

    def __init__(
        self, catalog: Catalog, down_after: float, host_refresh: float,
        read_now: Callable[[str], PlacedVm | None] | None = None,
    ) -> None:  # fmt: skip
        self.catalog = catalog
        self.read_now = read_now  # a synchronous read of one VM, where the catalog allows one (SQLite)
        self.down_after = down_after
        self.host_refresh = host_refresh
        self._vms: dict[str, PlacedVm] = {}
        self._hosts: dict[str, HostRecord] = {}
        self._reloads: set[str] = set()
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe: Unsubscribe | None = None
        self.listeners: list[Callable[[VmRecord], None]] = []  # told when a VM's state changes

    async def start(self) -> None:
        await self.reload_all()
        if self.catalog.backend == "postgres":
            self._unsubscribe = await self.catalog.subscribe(self._changed, self._gap)
            self._tasks.append(asyncio.create_task(self._apply_changes_forever()))
        else:
            self._tasks.append(asyncio.create_task(self._poll_forever()))
        self._tasks.append(asyncio.create_task(self._refresh_hosts_forever()))

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def reload_all(self) -> None:
        await self.refresh_hosts()
        self._replace_all(await self.catalog.list_vms())

    async def refresh_hosts(self) -> None:
        self._hosts = {h.id: h for h in await self.catalog.hosts()}

    async def reload(self, vm_id: str) -> PlacedVm | None:
        placed = await self.catalog.get_vm(vm_id)
        self._put(vm_id, placed)
        return placed

    def _replace_all(self, placed: list[PlacedVm]) -> None:
        fresh = {p.rec.id: p for p in placed}
        for vm_id in set(self._vms) | set(fresh):
            self._put(vm_id, fresh.get(vm_id))

    def _put(self, vm_id: str, placed: PlacedVm | None) -> None:
        """Store a VM's new record; a change of state or generation goes to the listeners
        (upstreams of a VM gone quiet, or of an earlier generation, close)."""
        before = self._vms.get(vm_id)
        if before is not None and placed is not None and placed.rec.state_changed_at < before.rec.state_changed_at:
            return  # older than what this edge knows (a reload overtaken by a wake it asked for)
        if placed is None:
            self._vms.pop(vm_id, None)
        else:
            self._vms[vm_id] = placed
        if before is not None and (
            placed is None
            or placed.rec.state is not before.rec.state
            or placed.rec.generation != before.rec.generation
        ):
            gone = placed.rec if placed is not None else replace(before.rec, state=VmState.TERMINATED)
            for listener in self.listeners:
                listener(gone)

    # ---- the request path: memory only ---------------------------------------------------

    def placed(self, vm_id: str) -> PlacedVm | None:
        return self._vms.get(vm_id)

    def host(self, host_id: str) -> HostRecord | None:
        return self._hosts.get(host_id)

    def host_up(self, host_id: str) -> bool:
        host = self._hosts.get(host_id)
        return host is not None and time.time() - host.heartbeat_at < self.down_after

    def record(self, vm_id: str) -> VmRecord | None:
        """The VM's record; `unavailable` while its host is down (its real state is unknown then).

        A VM this table does not know may be newer than its last poll: where the catalog can be
        read synchronously, it is asked once before the answer is "no such VM".
        """
        placed = self._vms.get(vm_id)
        if placed is None and self.read_now is not None:
            try:
                placed = self.read_now(vm_id)
            except VmmError as exc:
                log.event("routes.read_failed", level="warning", vm=vm_id, error=str(exc))
            if placed is not None:
                self._put(vm_id, placed)
        return None if placed is None else self._shown(placed)

    def _shown(self, placed: PlacedVm) -> VmRecord:
        """The record as this edge shows it. The `unavailable` copy is read for its state's value (JSON,
        metrics) and is never running, so a request for it goes to the host's wake, which answers 503."""
        if not self.host_up(placed.host_id):
            return replace(placed.rec, state=cast(VmState, FleetState.UNAVAILABLE))
        return placed.rec

    def records(self) -> list[tuple[str, VmRecord]]:
        return [(p.host_id, self._shown(p)) for p in self._vms.values()]

    def reachable_host(self, placed: PlacedVm) -> HostRecord:
        """The host a VM's requests go to; NotRunning (503) while it misses heartbeats."""
        host = self._hosts.get(placed.host_id)
        if host is None or not self.host_up(placed.host_id):
            raise NotRunning(
                f"VM {placed.rec.id} is unavailable: its host {placed.host_id} is not answering heartbeats"
            )
        return host

    def hosts(self) -> list[HostRecord]:
        return list(self._hosts.values())

    def set_state(self, vm_id: str, state: VmState, changed_at: float, generation: int) -> None:
        """What this edge just made true (a wake it asked for), before the catalog's feed says so."""
        placed = self._vms.get(vm_id)
        if placed is not None and changed_at >= placed.rec.state_changed_at:
            rec = placed.rec
            rec.state, rec.state_changed_at, rec.generation = state, changed_at, generation

    # ---- keeping it current ------------------------------------------------------------------

    def _changed(self, vm_id: str) -> None:
        self._reloads.add(vm_id)
        self._wakeup.set()

    def _gap(self) -> None:
        self._reloads.add("*")
        self._wakeup.set()

    async def _apply_changes_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            pending, self._reloads = self._reloads, set()
            try:
                if "*" in pending:
                    await self.reload_all()
                else:
                    for vm_id in pending:
                        await self.reload(vm_id)
            except VmmError as exc:
                log.event("routes.reload_failed", level="warning", error=str(exc))
                self._reloads |= pending
                await asyncio.sleep(self.host_refresh)
                self._wakeup.set()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL)
            try:
                self._replace_all(await self.catalog.list_vms())
            except VmmError as exc:
                log.event("routes.reload_failed", level="warning", error=str(exc))

    async def _refresh_hosts_forever(self) -> None:
        while True:
            await asyncio.sleep(self.host_refresh)
            try:
                await self.refresh_hosts()
            except VmmError as exc:
                log.event("routes.hosts_failed", level="warning", error=str(exc))
