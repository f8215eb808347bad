"""A VM's lifecycle as one transition table: every state change the manager makes goes through `Lifecycle`.

The table says which state may follow which. Writing the same state again is always allowed
(a record that changes another field, such as the RAM mode after a restore) except for a
terminated VM. After a restart of the manager, recovery records what it found, whatever the
record said before (a QEMU still running, a snapshot that is complete or not): that is
`RECOVERED_TO`, checked apart from the moves a live manager makes.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Protocol

from .errors import Conflict, RegistryError, VmmError
from .events import event_type
from .jsonlog import log
from .model import VmRecord, VmState

_S = VmState
_GONE = (_S.TERMINATING, _S.FAILED)  # delete and an unexpected QEMU exit can come from any live state

MOVES: dict[VmState, frozenset[VmState]] = {
    _S.PENDING: frozenset((_S.RUNNING, *_GONE)),  # launched (or its launch failed)
    # RUNNING is written ahead of a restore's `cont`: a restore that fails before the guest ran is
    # suspended again.
    _S.RUNNING: frozenset((_S.PAUSED, _S.SUSPENDING, _S.SUSPENDED, *_GONE)),
    _S.PAUSED: frozenset((_S.RUNNING, _S.SUSPENDING, *_GONE)),
    # A complete snapshot; or undone (back to what it was), or QEMU died under it.
    _S.SUSPENDING: frozenset((_S.SUSPENDED, _S.RUNNING, _S.PAUSED, *_GONE)),
    _S.SUSPENDED: frozenset((_S.RESTORING, _S.TERMINATING)),  # woken, deleted or moved away
    _S.RESTORING: frozenset((_S.RUNNING, _S.SUSPENDED, *_GONE)),  # a failed restore stays suspended
    _S.FAILED: frozenset((_S.TERMINATING,)),
    _S.TERMINATING: frozenset((_S.TERMINATED,)),
    _S.TERMINATED: frozenset(),
}

# What recovery may find a VM to be, from any state but terminated.
RECOVERED_TO = frozenset((_S.RUNNING, _S.PAUSED, _S.SUSPENDED, _S.FAILED))


class IllegalTransition(VmmError):
    """A move the table does not have: a bug in the manager, never the caller's input."""

    http_status = 500


def check(old: VmState, new: VmState, recovered: bool = False) -> None:
    """Raise IllegalTransition unless `old -> new` is in the table (or a recovery's finding)."""
    if old is new and old is not _S.TERMINATED:
        return
    if recovered and old is not _S.TERMINATED and new in RECOVERED_TO:
        return
    if new not in MOVES[old]:
        raise IllegalTransition(f"a VM cannot go from {old.value} to {new.value}")


class RecordWriter(Protocol):
    """Where a move is written (vmm.records.RecordStore)."""

    def write(self, rec: VmRecord) -> None: ...
    def mark_saved(self, vm_id: str) -> None: ...
    def mark_unsaved(self, vm_id: str) -> None: ...
    def notify(self, rec: VmRecord) -> None: ...
    def emit(self, kind: str, rec: VmRecord) -> object: ...


class Lifecycle:
    """The only way a VM's state changes: each move is checked against the table, then written.

    Two kinds of move, named for what they promise when the registry cannot take the write:
    `move_if_stored` is a decision not yet acted on (it is undone and refused, 507), while
    `record_outcome` states what already happened (it stays true in memory; the flusher
    writes it once it can). Each move that reaches a new state is one lifecycle event
    (vmm.events.event_type), emitted after the record is written and before listeners hear of it.
    """

    def __init__(self, records: RecordWriter) -> None:
        self.records = records

    @staticmethod
    def refuse_unless(rec: VmRecord, *states: VmState) -> None:
        """A caller's request needs the VM in one of `states`: Conflict (409) otherwise."""
        if rec.state not in states:
            wanted = " or ".join(s.value for s in states)
            raise Conflict(f"VM {rec.id} is {rec.state.value}, not {wanted}")

    def move_if_stored(self, rec: VmRecord, state: VmState, reason: str | None = None) -> None:
        """Make a move before acting on it: written first; if the registry cannot take it, the
        record stays as it was and RegistryError says so."""
        check(rec.state, state)
        before = (rec.state, rec.reason, rec.state_changed_at)
        rec.state, rec.reason, rec.state_changed_at = state, reason, time.time()
        try:
            self.records.write(rec)
        except (sqlite3.Error, OSError) as exc:
            rec.state, rec.reason, rec.state_changed_at = before
            log.event("vm.registry_write_failed", level="error", vm=rec.id, state=state.value, error=str(exc))
            raise RegistryError(
                f"VM {rec.id} stays {before[0].value}: the registry could not record it as {state.value}: {exc}"
            ) from exc
        self._emit(before[0], rec)
        self.records.notify(rec)

    def record_outcome(
        self, rec: VmRecord, state: VmState, reason: str | None = None, recovered: bool = False, event: bool = True
    ) -> None:
        """Record what already happened (QEMU is gone, a snapshot is complete): it stays true in
        memory even if the registry write fails. `recovered`: what recovery found after a restart,
        whatever the record said (RECOVERED_TO). `event=False`: the caller emits its own (a move away)."""
        check(rec.state, state, recovered)
        old = rec.state
        rec.state, rec.reason, rec.state_changed_at = state, reason, time.time()
        try:
            self.records.write(rec)
            self.records.mark_saved(rec.id)
        except (sqlite3.Error, OSError) as exc:
            self.records.mark_unsaved(rec.id)
            log.event("vm.registry_write_failed", level="error", vm=rec.id, state=state.value, error=str(exc),
                      retry=True)  # fmt: skip
        if event:
            self._emit(old, rec)
        self.records.notify(rec)

    def _emit(self, old: VmState, rec: VmRecord) -> None:
        kind = event_type(old, rec.state)
        if kind is not None:
            self.records.emit(kind, rec)
