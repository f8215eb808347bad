"""What every catalog backend offers: the state VM hosts and edge workers share.

VM hosts write their capacity, their VMs and their templates here; stateless edges read it
to route requests and race each other (via `set_state`) to wake a VM, so exactly one of them
starts its restore.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from vmm.events import Event
from vmm.model import VmRecord, VmState

ChangeCallback = Callable[[str], None]  # gets the id of a VM whose route or state changed
GapCallback = Callable[[], None]  # the feed was interrupted: changes may have been missed, reload
Unsubscribe = Callable[[], None]


@dataclass(frozen=True)
class Capacity:
    """What a host can still give to new VMs."""

    memory_mb: int
    vcpus: int
    disk_mb: int


@dataclass(frozen=True)
class HostRecord:
    """A VM host as its last heartbeat described it; `up` is false once it missed the threshold."""

    id: str
    address: str
    capacity: Capacity
    heartbeat_at: float
    up: bool


@dataclass(frozen=True)
class PlacedVm:
    """A VM record and the host it lives on, which is where an edge routes its requests."""

    host_id: str
    rec: VmRecord


class Catalog(Protocol):
    """The shared catalog; every method is one transaction, and writers of VMs feed `subscribe`.

    A store that fails (server gone, database locked, disk full) raises CatalogError (503).
    """

    backend: str  # "sqlite" | "postgres"
    migrated: tuple[int, ...]  # schema versions this start applied; empty when the schema was current

    async def close(self) -> None: ...

    async def heartbeat(self, host_id: str, address: str, capacity: Capacity, at: float) -> None:
        """Register the host or refresh it; a heartbeat brings a host marked down back up."""

    async def hosts(self) -> list[HostRecord]: ...

    async def mark_down(self, older_than: float) -> list[str]:
        """Mark down the up hosts whose last heartbeat is before `older_than`; returns their ids."""

    async def create_vm(self, rec: VmRecord, host_id: str) -> None:
        """Add a VM on a host; raises Conflict if the id is taken."""

    async def get_vm(self, vm_id: str) -> PlacedVm | None: ...

    async def list_vms(
        self, host_id: str | None = None, states: Collection[VmState] | None = None
    ) -> list[PlacedVm]: ...

    async def save_vm(self, rec: VmRecord, host_id: str | None = None) -> None:
        """Overwrite a VM's record (its host stays); raises NotFound if it does not exist
        (or, with `host_id`, is not on that host: a host never overwrites a VM that moved away)."""

    async def delete_vm(self, vm_id: str, host_id: str | None = None) -> bool:
        """Remove a VM (with `host_id`: only if it is on that host); returns whether it did."""

    async def move_vm(self, vm_id: str, from_host: str, to_host: str) -> bool:
        """Re-place a VM on another host, if it is still on `from_host`; returns whether it moved."""

    async def set_state(
        self, vm_id: str, from_states: Collection[VmState], to_state: VmState, at: float | None = None
    ) -> bool:
        """Move the VM to `to_state` only if it is in one of `from_states`; returns whether this call won.

        Atomic across processes: of many concurrent callers exactly one sees True.
        """

    async def touch_many(self, activity: Mapping[str, float]) -> None:
        """Record last-activity times in one statement; a time never moves backwards."""

    async def add_template(self, name: str, host_id: str) -> None: ...

    async def remove_template(self, name: str, host_id: str) -> None: ...

    async def template_hosts(self, name: str) -> set[str]:
        """The hosts that hold the template, i.e. where a VM of it can be created."""

    async def append_events(self, host_id: str, events: Sequence[Event]) -> list[Event]:
        """Number a host's events after every event of the fleet, in one transaction that no other
        append interleaves with (so seqs become visible in order); returns them renumbered.
        Each keeps its host's own number (host_seq), so the host knows what it has sent."""

    async def events_after(self, seq: int, limit: int) -> list[Event]:
        """The fleet's events after `seq`, oldest first, at most `limit`."""

    async def last_host_seq(self, host_id: str) -> int:
        """The host's own number of its newest event here (0: none)."""

    async def trim_events(self, keep: int, older_than: float) -> None:
        """Drop all but the newest `keep` events and those older than `older_than`; the newest stays."""

    async def subscribe(self, callback: ChangeCallback, on_gap: GapCallback | None = None) -> Unsubscribe:
        """Call `callback(vm_id)` after each committed change of a VM's route or state.

        Once this returns, every later change is delivered. Activity times are not changes.
        If the feed breaks (PostgreSQL: its connection was lost) and comes back, `on_gap()` is
        called, since changes in between were missed and whatever was cached must be reloaded.
        """
