"""The fleet's lifecycle events: hosts append theirs to the catalog, edges follow the catalog.

A host numbers its VMs' events in its own registry (vmm.events); `EventForwarder` appends
them to the catalog in order, which numbers them again across the fleet, and hands each one
so numbered to the host's webhooks. `CatalogEvents` keeps an edge's EventRing current by
reading the catalog's new events every POLL seconds, so every edge serves the same sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from fleet.catalog import Catalog
from vmm.errors import VmmError
from vmm.events import Event, EventRing, EventsSettings
from vmm.jsonlog import log
from vmm.tasks import cancelled

POLL = 0.2  # seconds between an edge's reads of the catalog's new events
BATCH = 500  # events per catalog read or append


class EventForwarder:
    """Appends this host's events to the catalog, oldest first, never one twice, none skipped."""

    def __init__(self, catalog: Catalog, host_id: str, local: EventRing, settings: EventsSettings, retry: float):
        self.catalog = catalog
        self.host_id = host_id
        self.local = local
        self.settings = settings
        self.retry = retry
        self.listeners: list[Callable[[Event], None]] = []  # told of each event as the fleet numbered it
        self._sent = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Resume after the last event the catalog has from this host (a registry that is new: all)."""
        sent = await self.catalog.last_host_seq(self.host_id)
        self._sent = sent if sent <= self.local.last_seq else 0
        self._task = asyncio.create_task(self._forward_forever())

    async def stop(self) -> None:
        await cancelled([self._task])
        with contextlib.suppress(VmmError):
            await self.forward()

    async def forward(self) -> None:
        """Append every event recorded so far and not yet in the catalog."""
        while pending := self.local.after(self._sent)[:BATCH]:
            numbered = await self.catalog.append_events(self.host_id, pending)
            self._sent = pending[-1].seq
            for ev in numbered:
                for listener in self.listeners:
                    listener(ev)

    async def trim(self) -> None:
        await self.catalog.trim_events(self.settings.retain_count, time.time() - self.settings.retain_seconds)

    async def _forward_forever(self) -> None:
        while True:
            await self.local.wait(self._sent, 60.0)
            try:
                await self.forward()
            except VmmError as exc:
                log.event("host.events_append_failed", level="warning", error=str(exc))
                await asyncio.sleep(self.retry)


class CatalogEvents:
    """An edge's EventRing, filled from the catalog."""

    def __init__(self, catalog: Catalog, settings: EventsSettings) -> None:
        self.catalog = catalog
        self.ring = EventRing(settings.retain_count, settings.retain_seconds)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.read()
        self._task = asyncio.create_task(self._poll_forever())

    async def stop(self) -> None:
        await cancelled([self._task])

    async def read(self) -> None:
        """Take every event the catalog has after the ring's last."""
        while batch := await self.catalog.events_after(self.ring.last_seq, BATCH):
            self.ring.add(batch)
            if len(batch) < BATCH:
                return

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL)
            try:
                await self.read()
            except VmmError as exc:
                log.event("edge.events_read_failed", level="warning", error=str(exc))
