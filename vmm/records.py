"""The record store: the VMs in memory, their registry writes, the activity flusher, and the
terminated records kept for a while.

Reads are memory only (the edge's hot path). Transitions write through at once; activity is
batched every ACTIVITY_FLUSH_SECONDS; a record whose write failed is retried by the flusher.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable

from .errors import NotFound
from .events import Event, EventRing, new_event
from .jsonlog import log
from .live import LiveVm
from .model import VmRecord, VmState
from .registry import ProcessIntent, Registry
from .settings import VmmSettings

ACTIVITY_FLUSH_SECONDS = 2.0


class RecordStore:
    """Every VM this manager has (live or recently terminated), kept in memory and in the registry."""

    def __init__(self, settings: VmmSettings) -> None:
        self.settings = settings
        self.live: dict[str, LiveVm] = {}
        self.terminated: dict[str, VmRecord] = {}  # kept for `mvm vm get` until vmm.terminated_ttl
        self.listeners: list[Callable[[VmRecord], None]] = []  # told of every change of a record
        self._dirty: set[str] = set()  # activity not yet flushed
        self._unsaved: set[str] = set()  # records whose last registry write failed; the flusher retries
        events = settings.events
        self.events = EventRing(events.retain_count, events.retain_seconds)  # the feed's retained events
        self._registry: Registry | None = None
        self._flusher: asyncio.Task[None] | None = None

    def open(self) -> list[VmRecord]:
        """Open the registry; every record it holds, terminated ones go to `terminated` at once."""
        self._registry = Registry(self.settings.registry_path)
        records = self._registry.load_all()
        self.events.add(self._registry.load_events(self.events.retain_count))
        for rec in records:
            if rec.state is VmState.TERMINATED:
                self.terminated[rec.id] = rec
        return [rec for rec in records if rec.id not in self.terminated]

    def start_flusher(self) -> None:
        self._flusher = asyncio.create_task(self._flush_forever())

    async def stop_flusher(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher

    def close(self) -> None:
        """Flush what is left and close the registry."""
        self.flush()
        if self._registry is not None:
            self._registry.close()

    # ---- the VMs in memory ---------------------------------------------------------------

    def get(self, vm_id: str) -> LiveVm:
        vm = self.live.get(vm_id)
        if vm is None:
            raise NotFound(f"VM {vm_id!r} does not exist")
        return vm

    def add(self, vm: LiveVm) -> None:
        self.terminated.pop(vm.rec.id, None)  # a VM that left this host once and is back: live again
        self.live[vm.rec.id] = vm

    def forget(self, vm_id: str) -> None:
        """The VM is gone from this manager: no more activity or retries for it as a live VM."""
        self.live.pop(vm_id, None)
        self._dirty.discard(vm_id)
        self._unsaved.discard(vm_id)

    def bury(self, rec: VmRecord) -> None:
        """Keep a terminated VM's record (with its reason) until vmm.terminated_ttl."""
        self.terminated[rec.id] = rec

    def touch(self, vm_id: str, at: float | None = None) -> None:
        """Activity now, or at `at` (an edge's batch); never moves the time backwards."""
        vm = self.live.get(vm_id)
        if vm is not None:
            vm.rec.last_activity = max(vm.rec.last_activity, time.time() if at is None else at)
            self._dirty.add(vm_id)

    def notify(self, rec: VmRecord) -> None:
        for listener in self.listeners:
            listener(rec)

    def emit(self, kind: str, rec: VmRecord, **extra: object) -> Event:
        """Number a lifecycle event, write it beside the record, and hand it to the feed.

        A registry that cannot take it leaves it in memory only (logged): the change happened.
        """
        ev = new_event(self.events.last_seq + 1, kind, rec, **extra)
        try:
            if self._registry is not None:
                self._registry.add_event(ev)
        except (sqlite3.Error, OSError) as exc:
            log.event("vm.event_write_failed", level="error", vm=rec.id, seq=ev.seq, type=kind, error=str(exc))
        self.events.add([ev])
        return ev

    # ---- registry writes -----------------------------------------------------------------

    def write(self, rec: VmRecord) -> None:
        """Write one record now; raises sqlite3.Error or OSError when the registry cannot take it."""
        if self._registry is not None:
            self._registry.save(rec)

    def mark_saved(self, vm_id: str) -> None:
        self._unsaved.discard(vm_id)

    def mark_unsaved(self, vm_id: str) -> None:
        self._unsaved.add(vm_id)

    def add_process(self, intent: ProcessIntent) -> None:
        """A QEMU we started, written before anything depends on it (raises like `write`)."""
        if self._registry is not None:
            self._registry.add_process(intent, time.time())

    def forget_process(self, pid: int) -> None:
        """The process ended: its write-ahead record goes (a stale one is harmless, its start time differs)."""
        if self._registry is not None:
            with contextlib.suppress(sqlite3.Error, OSError):
                self._registry.remove_process(pid)

    def processes(self, vm_id: str) -> list[ProcessIntent]:
        return self._registry.processes(vm_id) if self._registry is not None else []

    def flush(self) -> None:
        """Retry failed record writes, write batched activity, purge old terminated records."""
        if self._registry is None:
            return
        for vm_id in list(self._unsaved):
            rec = self.live[vm_id].rec if vm_id in self.live else self.terminated.get(vm_id)
            try:
                if rec is not None:
                    self._registry.save(rec)
                self._unsaved.discard(vm_id)
            except (sqlite3.Error, OSError):
                break
        if self._dirty:
            with contextlib.suppress(sqlite3.Error, OSError):
                self._registry.save_activity(self.live[i].rec for i in self._dirty if i in self.live)
                self._dirty.clear()
        self._purge_terminated()
        with contextlib.suppress(sqlite3.Error, OSError):
            events = self.settings.events
            self._registry.trim_events(events.retain_count, time.time() - events.retain_seconds)

    def _purge_terminated(self) -> None:
        """Records of terminated VMs go after vmm.terminated_ttl."""
        cutoff = time.time() - self.settings.terminated_ttl
        for vm_id, rec in list(self.terminated.items()):
            if rec.state_changed_at < cutoff:
                try:
                    if self._registry is not None:
                        self._registry.delete(vm_id)
                except (sqlite3.Error, OSError):
                    return
                del self.terminated[vm_id]

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(ACTIVITY_FLUSH_SECONDS)
            self.flush()
