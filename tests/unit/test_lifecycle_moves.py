"""The lifecycle table, driven through the VM manager over a fake runtime (no QEMU, no namespaces).

Every move of the table that a live manager makes is made here through its public methods
(failures injected at named steps of the fake, or at vmm.faults points), and every call a state
does not allow is refused with the VM left as it was. Four moves of the table are made by no
path of a live manager (see NOT_MADE_LIVE): this test says so, so a change that starts or stops
making one is seen.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.unit.fake_runtime import FakeRuntime, write_template
from vmm import faults, template
from vmm.cgroups import GroupUsage
from vmm.errors import Conflict, RestoreFailed, VmFailed, VmmError
from vmm.lifecycle import MOVES
from vmm.manager import VmManager
from vmm.model import RamMode, VmRecord, VmState
from vmm.settings import VmmSettings

S = VmState
TABLE = {(old, new) for old, targets in MOVES.items() for new in targets}
NOT_MADE_LIVE = {
    (S.PENDING, S.FAILED),  # a launch that fails is terminated; only recovery finds a pending VM failed
    (S.SUSPENDING, S.TERMINATING),  # a delete waits for the VM's lock, which the suspend holds
    (S.RESTORING, S.FAILED),  # a restore fails a VM only after RUNNING is recorded (its guest ran)
    (S.RESTORING, S.TERMINATING),  # as for suspending
}


@dataclass
class Plane:
    manager: VmManager
    fake: FakeRuntime
    moves: list[tuple[VmState, VmState]]

    def state(self, vm_id: str) -> VmState:
        return self.manager.get(vm_id).state


def _demo_state(tmp_path: Path) -> tuple[VmmSettings, FakeRuntime]:
    """A state dir holding the demo template, and a fake runtime over it."""
    settings = VmmSettings(state_dir=tmp_path, memory_reserve_mb=0, guest_sync=False)
    write_template(settings)
    return settings, FakeRuntime(settings)


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    settings, fake = _demo_state(tmp_path)
    manager = VmManager(settings, runtime=fake)
    moves: list[tuple[VmState, VmState]] = []
    last: dict[str, VmState] = {}

    def seen(rec: VmRecord) -> None:
        before = last.get(rec.id, S.PENDING)  # a new record is written pending, before any listener hears
        if rec.state is not before:
            moves.append((before, rec.state))
        last[rec.id] = rec.state

    manager.listeners.append(seen)
    await manager.start()
    try:
        yield Plane(manager, fake, moves)
    finally:
        faults.disarm_all()
        await manager.close()


async def _launched(p: Plane, *steps: Callable[[str], Awaitable[object]]) -> str:
    vm_id = (await p.manager.create_vm("demo")).id
    for step in steps:
        await step(vm_id)
    return vm_id


async def test_the_manager_makes_every_move_of_the_table_but_the_ones_no_live_path_makes(plane: Plane) -> None:
    p, m, fake = plane, plane.manager, plane.fake
    # pending -> running -> paused -> running -> suspending -> suspended -> restoring -> running, twice
    # (the second suspend writes device state only), then deleted while suspended.
    vm = await _launched(p, m.pause, m.resume, m.suspend, m.resume, m.suspend, m.resume, m.suspend, m.delete)
    assert m.get(vm).state is S.TERMINATED and m.get(vm).ram_mode is RamMode.OWN_FILE
    await _launched(p, m.pause, m.suspend, m.delete)  # paused -> suspending
    await _launched(p, m.pause, m.delete)  # paused -> terminating
    await _launched(p, m.delete)  # running -> terminating
    fake.fail = {"load.launch"}
    with pytest.raises(VmFailed, match="could not launch"):
        await m.create_vm("demo")  # pending -> terminating -> terminated
    fake.fail = set()
    dies = await _launched(p)
    await fake.kill(m.records.get(dies))  # running -> failed
    assert p.state(dies) is S.FAILED and m.get(dies).reason == "killed by the test"
    await m.delete(dies)  # failed -> terminating
    await fake.kill(m.records.get(await _launched(p, m.pause)))  # paused -> failed

    unsaved = await _launched(p)
    fake.fail = {"save"}
    with pytest.raises(VmmError, match="stays running"):
        await m.suspend(unsaved)  # running -> suspending -> running
    await m.pause(unsaved)
    with pytest.raises(VmmError, match="stays paused"):
        await m.suspend(unsaved)  # paused -> suspending -> paused
    fake.dies_on_failed_save = True
    with pytest.raises(VmmError, match="stays failed"):
        await m.suspend(unsaved)  # paused -> suspending -> failed: its QEMU died under the save
    assert "during a suspend" in (m.get(unsaved).reason or "")
    fake.fail, fake.dies_on_failed_save = set(), False

    kept = await _launched(p, m.suspend)
    fake.fail = {"load.restore"}
    with pytest.raises(RestoreFailed, match="stays suspended"):
        await m.resume(kept)  # suspended -> restoring -> suspended
    fake.fail = set()
    faults.arm("restore.recorded", "raise")
    with pytest.raises(RestoreFailed, match="stays suspended"):
        await m.resume(kept)  # restoring -> running (written ahead of `cont`) -> suspended: the guest never ran
    faults.disarm_all()
    await m.resume(kept)
    assert p.state(kept) is S.RUNNING

    assert set(p.moves) <= TABLE
    assert set(p.moves) == TABLE - NOT_MADE_LIVE, (
        f"not made: {sorted(TABLE - NOT_MADE_LIVE - set(p.moves))}; "
        f"made although listed as not made: {sorted(NOT_MADE_LIVE & set(p.moves))}"
    )


# What each call does from each state a VM rests in: the state it ends in, or the error that refuses it.
_CALLS: dict[VmState, dict[str, VmState | type[Exception]]] = {
    S.RUNNING: {"pause": S.PAUSED, "resume": S.RUNNING, "suspend": S.SUSPENDED, "begin_export": Conflict},
    S.PAUSED: {"pause": S.PAUSED, "resume": S.RUNNING, "suspend": S.SUSPENDED, "begin_export": Conflict},
    S.SUSPENDED: {"pause": Conflict, "resume": S.RUNNING, "suspend": S.SUSPENDED, "begin_export": S.SUSPENDED},
    S.FAILED: {"pause": Conflict, "resume": VmFailed, "suspend": Conflict, "begin_export": Conflict},
}


async def _vm_in(p: Plane, state: VmState) -> str:
    vm_id = await _launched(p)
    if state is S.PAUSED:
        await p.manager.pause(vm_id)
    elif state is S.SUSPENDED:
        await p.manager.suspend(vm_id)
    elif state is S.FAILED:
        await p.fake.kill(p.manager.records.get(vm_id))
    assert p.state(vm_id) is state
    return vm_id


@pytest.mark.parametrize(("state", "call"), [(s, c) for s, calls in _CALLS.items() for c in calls])
async def test_a_call_is_done_or_refused_with_the_vm_left_as_it_was(plane: Plane, state: VmState, call: str) -> None:
    vm_id = await _vm_in(plane, state)
    made = len(plane.moves)
    expected = _CALLS[state][call]
    method = getattr(plane.manager, call)
    if isinstance(expected, VmState):
        await method(vm_id)
        assert plane.state(vm_id) is expected
        assert set(plane.moves[made:]) <= TABLE
    else:
        with pytest.raises(expected):
            await method(vm_id)
        assert plane.state(vm_id) is state and plane.moves[made:] == []


async def test_a_failed_launch_releases_exactly_what_it_acquired(plane: Plane) -> None:
    m, fake = plane.manager, plane.fake
    for step in ("create_network", "load.launch"):
        fake.fail = {step}
        with pytest.raises(VmFailed, match=f"fake runtime: {step} failed"):
            await m.create_vm("demo")
        (rec,) = m.records.terminated.values()
        assert rec.reason is not None and rec.reason.startswith("its launch failed")
        assert not fake.networks and not fake.egress and not fake.guests
        assert not (m.settings.vms_dir / rec.id).exists()
        assert m.list_vms() == []
        m.records.terminated.clear()


async def test_a_suspended_vm_holds_no_namespace_and_a_failed_restore_leaves_none(plane: Plane) -> None:
    m, fake = plane.manager, plane.fake
    vm_id = await _launched(plane)
    fake.groups[vm_id] = GroupUsage(0, 0, 0, -1)
    await m.suspend(vm_id)
    assert fake.cuts == [vm_id]  # its connections were cut before the namespace went
    assert vm_id not in fake.networks and vm_id not in fake.egress and vm_id not in fake.guests
    assert vm_id not in fake.groups
    fake.fail = {"load.restore"}
    with pytest.raises(RestoreFailed):
        await m.resume(vm_id)
    assert plane.state(vm_id) is S.SUSPENDED
    assert vm_id not in fake.networks and vm_id not in fake.egress and vm_id not in fake.guests
    fake.fail = set()
    await m.resume(vm_id)
    assert plane.state(vm_id) is S.RUNNING and vm_id in fake.networks and vm_id in fake.egress


async def test_a_restarted_manager_drops_the_namespace_a_suspended_vm_was_left_with(tmp_path: Path) -> None:
    settings, fake = _demo_state(tmp_path)
    first = VmManager(settings, runtime=fake)
    await first.start()
    vm_id = (await first.create_vm("demo")).id
    await first.suspend(vm_id)
    await first.close()
    fake.networks.add(vm_id)  # as a manager that died between the snapshot and the namespace's removal leaves it
    second = VmManager(settings, runtime=fake)
    await second.start()
    try:
        assert second.get(vm_id).state is S.SUSPENDED and vm_id not in fake.networks
        await second.resume(vm_id)
        assert vm_id in fake.networks
    finally:
        await second.close()


async def test_the_template_is_loaded_once_per_transition(plane: Plane, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    real_load = template.load

    def counting_load(settings: VmmSettings, name: str) -> object:
        loads.append(name)
        return real_load(settings, name)

    monkeypatch.setattr(template, "load", counting_load)
    m = plane.manager
    vm_id = (await m.create_vm("demo")).id
    # The first suspend also moves the RAM; a suspended VM's delete has no hook to run, so no template.
    for transition, times in ((m.suspend, 1), (m.resume, 1), (m.suspend, 1), (m.delete, 0)):
        loads.clear()
        await transition(vm_id)
        assert loads == ["demo"] * times, transition.__name__


async def test_recovery_finds_a_vm_whose_qemu_runs_on_and_one_whose_qemu_is_gone(tmp_path: Path) -> None:
    settings, first_fake = _demo_state(tmp_path)
    first = VmManager(settings, runtime=first_fake)
    await first.start()
    runs_on, gone = (await first.create_vm("demo")).id, (await first.create_vm("demo")).id
    await first.close()
    fake = FakeRuntime(settings)
    fake.adoptable[runs_on] = "running"
    second = VmManager(settings, runtime=fake)
    await second.start()
    try:
        assert second.get(runs_on).state is S.RUNNING and runs_on in fake.egress
        assert second.get(gone).state is S.FAILED
        assert second.get(gone).reason == "QEMU was gone when the manager restarted (running)"
    finally:
        await second.close()


async def test_a_damaged_snapshot_is_refused_and_kept_after_any_number_of_suspends(plane: Plane) -> None:
    m = plane.manager
    vm_id = await _launched(plane, m.suspend, m.resume, m.suspend)  # the second suspend: device state only
    state = m.settings.vms_dir / vm_id / "state"
    state.write_bytes(b"damaged")
    with pytest.raises(RestoreFailed, match="does not match its checksum"):
        await m.resume(vm_id)
    assert plane.state(vm_id) is S.SUSPENDED and state.read_bytes() == b"damaged"


async def test_cgroups_are_swept_when_a_vm_fails_and_at_start_for_every_vm_without_a_qemu(tmp_path: Path) -> None:
    settings, fake = _demo_state(tmp_path)
    first = VmManager(settings, runtime=fake)
    await first.start()
    assert fake.swept == [set()]  # nothing known yet: only groups past their grace, marked as this state dir's
    running, suspended, failed, deleted = [(await first.create_vm("demo")).id for _ in range(4)]
    await first.suspend(suspended)
    await fake.kill(first.records.get(failed))
    assert fake.swept[-1] == {failed}  # its reason was read from the group: now the group goes
    await first.delete(deleted)
    await first.close()
    fake.adoptable[running] = "running"
    second = VmManager(settings, runtime=fake)
    await second.start()
    try:
        assert fake.swept[-1] == {suspended, failed, deleted}  # not the running VM's: its QEMU was re-adopted
    finally:
        await second.close()
