"""The lifecycle table: every move it lists is allowed, every other one refused."""

from __future__ import annotations

import itertools

import pytest

from vmm.lifecycle import MOVES, RECOVERED_TO, IllegalTransition, check
from vmm.model import VmState

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
        if s not in (VmState.TERMINATING, VmState.TERMINATED, VmState.UNAVAILABLE)
    )
