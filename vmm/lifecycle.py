"""A VM's lifecycle as one transition table: every state change the manager makes is checked here.

The table says which state may follow which. Writing the same state again is always allowed
(a record that changes another field, such as the RAM mode after a restore) except for a
terminated VM. After a restart of the manager, recovery records what it found, whatever the
record said before (a QEMU still running, a snapshot that is complete or not): that is
`RECOVERED_TO`, checked apart from the moves a live manager makes.
"""

from __future__ import annotations

from .errors import VmmError
from .model import VmState

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
    _S.UNAVAILABLE: frozenset(),  # shown by edges only, never a manager's state
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
