"""A VM host's side of the catalog: its heartbeat, its VMs' records and its templates.

The manager stays the owner of its VMs (its local registry survives a catalog outage);
the catalog is what edges route by, so every state change is pushed to it in order, from
one task, and activity times go in one batch per second, never as a write per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from dataclasses import dataclass

from fleet.catalog import Capacity, Catalog
from fleet.event_feed import EventForwarder
from vmm.capacity import mem_available_mb
from vmm.errors import Conflict, NotFound, VmmError
from vmm.jsonlog import log
from vmm.manager import VmManager
from vmm.model import VmRecord, VmState
from vmm.tasks import cancelled


@dataclass(frozen=True)
class HostAddress:
    """Where edges reach a host: its API (http://host:port) and its data port (host:port), as one catalog field."""

    api: str
    data: str

    def __str__(self) -> str:
        return f"{self.api} {self.data}"

    @classmethod
    def parse(cls, text: str) -> HostAddress:
        api, _, data = text.partition(" ")
        return cls(api, data)


def capacity(manager: VmManager) -> Capacity:
    """What this machine can still give new VMs: memory beyond its reserve, cores, free disk of the state dir."""
    memory = max(0, mem_available_mb() - manager.settings.memory_reserve_mb)
    disk = shutil.disk_usage(manager.settings.vms_dir)
    return Capacity(memory_mb=memory, vcpus=os.cpu_count() or 1, disk_mb=disk.free >> 20)


class HostSync:
    """Keeps the catalog's view of this host current: heartbeats, VM records, activity, templates."""

    def __init__(self, catalog: Catalog, manager: VmManager, host_id: str, interval: float) -> None:
        self.catalog = catalog
        self.manager = manager
        self.host_id = host_id
        self.address = HostAddress("", "")  # known once the host API and the data port listen (start)
        self.interval = interval
        self._changed: asyncio.Queue[str] = asyncio.Queue()
        self._publishing = asyncio.Lock()  # held from taking a change to having written it
        self._flushed: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.events = EventForwarder(catalog, host_id, manager.records.events, manager.settings.events, interval)

    async def start(self, address: HostAddress) -> None:
        """Publish this host at `address`, every VM and template it has, then follow changes."""
        self.address = address
        await self.heartbeat()
        for rec in self.manager.list_vms():
            await self.publish(rec)
            self._flushed[rec.id] = rec.last_activity
        for placed in await self.catalog.list_vms(host_id=self.host_id):
            if self.manager.lookup(placed.rec.id) is None:
                await self.catalog.delete_vm(placed.rec.id)
                log.event("host.vm_forgotten", vm=placed.rec.id, why="listed here in the catalog, unknown to this host")
        await self.sync_templates()
        self.manager.listeners.append(lambda rec: self._changed.put_nowait(rec.id))
        await self.events.start()
        self._tasks = [asyncio.create_task(loop()) for loop in (self._push_forever, self._beat_forever)]

    async def stop(self) -> None:
        await cancelled(self._tasks)
        with contextlib.suppress(VmmError):
            await self._push_pending()
        await self.events.stop()

    async def heartbeat(self) -> None:
        await self.catalog.heartbeat(self.host_id, str(self.address), capacity(self.manager), time.time())

    async def sync_templates(self, removed: str | None = None) -> None:
        """The catalog lists this host under every template it has (and no longer under `removed`)."""
        if removed is not None:
            await self.catalog.remove_template(removed, self.host_id)
        for tpl in self.manager.templates():
            await self.catalog.add_template(tpl.name, self.host_id)

    async def publish(self, rec: VmRecord) -> None:
        """Write one VM's record as it is now: added, overwritten, or removed once terminated.

        Only while the catalog places it here: a VM that moved to another host is that host's to write.
        """
        if rec.state is VmState.TERMINATED:
            await self.catalog.delete_vm(rec.id, self.host_id)
            self._flushed.pop(rec.id, None)
            return
        try:
            await self.catalog.save_vm(rec, self.host_id)
            return
        except NotFound:
            if await self.catalog.get_vm(rec.id) is not None:
                return  # placed on another host now
        try:
            await self.catalog.create_vm(rec, self.host_id)
        except Conflict:  # published meanwhile by the other writer (flush vs. the push task)
            with contextlib.suppress(NotFound):
                await self.catalog.save_vm(rec, self.host_id)

    async def flush(self) -> None:
        """Publish every change made so far, now: a host API answer is never ahead of the catalog."""
        async with self._publishing:
            await self._push_pending()

    async def _publish_current(self, vm_id: str) -> None:
        """The VM's record as it is now (live, or terminated and kept for a while)."""
        try:
            rec = self.manager.get(vm_id)
        except NotFound:
            return  # its terminated record is gone too: nothing left to publish
        await self.publish(rec)

    async def _push_pending(self) -> None:
        while not self._changed.empty():
            await self._publish_current(self._changed.get_nowait())

    async def _push_forever(self) -> None:
        """Changes in order; a catalog that fails is retried, the change kept, so edges converge."""
        while True:
            vm_id = await self._changed.get()
            async with self._publishing:  # taken without yielding: no flush slips in between
                while True:
                    try:
                        await self._publish_current(vm_id)
                        break
                    except VmmError as exc:
                        log.event("host.catalog_write_failed", level="warning", vm=vm_id, error=str(exc))
                        await asyncio.sleep(self.interval)

    async def _beat_forever(self) -> None:
        """Heartbeat and the activity batch, once per interval (about once a second per VM)."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.heartbeat()
                await self._flush_activity()
                await self.events.trim()
            except VmmError as exc:
                log.event("host.heartbeat_failed", level="warning", error=str(exc))

    async def _flush_activity(self) -> None:
        changed = {
            rec.id: rec.last_activity
            for rec in self.manager.list_vms()
            if rec.last_activity > self._flushed.get(rec.id, 0.0)
        }
        if changed:
            await self.catalog.touch_many(changed)
            self._flushed.update(changed)
