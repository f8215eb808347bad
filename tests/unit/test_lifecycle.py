"""The lifecycle table: every move it lists is allowed, every other one refused, by `check` and by
`Lifecycle`, the only way a state changes (the manager over a fake runtime: test_lifecycle_moves.py)."""

from __future__ import annotations

import itertools
import sqlite3

import pytest

from vmm.errors import Conflict, RegistryError
from vmm.lifecycle import MOVES, RECOVERED_TO, IllegalTransition, Lifecycle, check
from vmm.model import VmRecord, VmState
from vmm.policy import Policy

_PAIRS = list(itertools.product(VmState, VmState))


@pytest.mark.parametrize(
    ("old", "new"), [(o, n) for o, n in _PAIRS if n in MOVES[o] or (o is n and o is not VmState.TERMINATED)]
)
def test_every_legal_move_is_allowed(old: VmState, new: VmState) -> None:
    check(old, new)


@pytest.mark.parametrize(
    ("old", "new"), [(o, n) for o, n in _PAIRS if n not in MOVES[o] and (o is not n or o is VmState.TERMINATED)]
)
def test_every_other_move_is_refused(old: VmState, new: VmState) -> None:
    with pytest.raises(IllegalTransition, match=f"from {old.value} to {new.value}"):
        check(old, new)


def test_recovery_may_find_any_live_record_running_paused_suspended_or_failed() -> None:
    for old in VmState:
        for new in RECOVERED_TO:
            if old is VmState.TERMINATED:
                with pytest.raises(IllegalTransition):
                    check(old, new, recovered=True)
            else:
                check(old, new, recovered=True)
    with pytest.raises(IllegalTransition):
        check(VmState.RUNNING, VmState.RESTORING, recovered=True)


def test_the_table_covers_every_state_and_nothing_leaves_terminated() -> None:
    assert set(MOVES) == set(VmState)
    assert MOVES[VmState.TERMINATED] == frozenset()
    assert all(
        VmState.TERMINATING in MOVES[s]
        for s in VmState
        if s not in (VmState.TERMINATING, VmState.TERMINATED)
    )


class _Records:
    """A RecordWriter that keeps what it was given, and fails its writes on request."""

    def __init__(self) -> None:
        self.written: list[VmState] = []
        self.heard: list[VmState] = []
        self.events: list[str] = []
        self.unsaved: set[str] = set()
        self.broken = False

    def write(self, rec: VmRecord) -> None:
        if self.broken:
            raise sqlite3.OperationalError("disk I/O error")
        self.written.append(rec.state)

    def mark_saved(self, vm_id: str) -> None:
        self.unsaved.discard(vm_id)

    def mark_unsaved(self, vm_id: str) -> None:
        self.unsaved.add(vm_id)

    def notify(self, rec: VmRecord) -> None:
        self.heard.append(rec.state)

    def emit(self, kind: str, rec: VmRecord) -> None:
        self.events.append(kind)


def _rec(state: VmState) -> VmRecord:
    return VmRecord("vabcdefghijk", "demo", state, Policy(), 8080, 1.0, 1.0, reason="before")


@pytest.mark.parametrize(("old", "new"), [(o, n) for o, n in _PAIRS if n in MOVES[o]])
@pytest.mark.parametrize("kind", ["move_if_stored", "record_outcome"])
def test_a_legal_move_is_made_written_and_told(old: VmState, new: VmState, kind: str) -> None:
    records, rec = _Records(), _rec(old)
    getattr(Lifecycle(records), kind)(rec, new, reason="why")
    assert (rec.state, rec.reason) == (new, "why")
    assert records.written == records.heard == [new]


@pytest.mark.parametrize(
    ("old", "new"), [(o, n) for o, n in _PAIRS if n not in MOVES[o] and (o is not n or o is VmState.TERMINATED)]
)
@pytest.mark.parametrize("kind", ["move_if_stored", "record_outcome"])
def test_an_illegal_move_is_refused_and_nothing_is_written(old: VmState, new: VmState, kind: str) -> None:
    records, rec = _Records(), _rec(old)
    with pytest.raises(IllegalTransition):
        getattr(Lifecycle(records), kind)(rec, new)
    assert (rec.state, rec.reason) == (old, "before")
    assert records.written == records.heard == []


def test_a_move_the_registry_cannot_take_is_undone_but_an_outcome_stays_and_is_retried() -> None:
    records, rec = _Records(), _rec(VmState.RUNNING)
    records.broken = True
    lifecycle = Lifecycle(records)
    with pytest.raises(RegistryError, match="stays running"):
        lifecycle.move_if_stored(rec, VmState.PAUSED)
    assert rec.state is VmState.RUNNING and records.heard == [] and not records.unsaved
    lifecycle.record_outcome(rec, VmState.FAILED, reason="QEMU died")
    assert rec.state is VmState.FAILED and records.heard == [VmState.FAILED] and records.unsaved == {rec.id}
    records.broken = False
    lifecycle.record_outcome(rec, VmState.TERMINATING)
    assert not records.unsaved


def test_refuse_unless_names_the_states_a_call_needs() -> None:
    Lifecycle.refuse_unless(_rec(VmState.PAUSED), VmState.RUNNING, VmState.PAUSED)
    with pytest.raises(Conflict, match="is suspended, not running or paused"):
        Lifecycle.refuse_unless(_rec(VmState.SUSPENDED), VmState.RUNNING, VmState.PAUSED)
