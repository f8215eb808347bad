"""The bound on concurrent restores (vmm.restore_gate, vmm.max_concurrent_restores): every queued wake is
served, first come first served, and a queued wake's time in the queue does not count against the edge's
wake_timeout (edge.reach)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edge.reach import reach
from tests.unit.fake_runtime import FakeRuntime, write_template
from tests.unit.proxy_harness import VM
from tests.unit.test_reach import Events, _backend, _context, _exchange
from vmm.errors import VmmError
from vmm.manager import VmManager
from vmm.model import VmState
from vmm.restore_gate import RestoreGate, default_bound
from vmm.settings import VmmSettings


async def test_the_gate_serves_waiters_in_arrival_order_and_a_leaver_hands_its_turn_on() -> None:
    gate = RestoreGate(1)
    order: list[str] = []
    release = asyncio.Event()

    async def restore(name: str) -> None:
        async with gate.slot(name):
            order.append(name)
            await release.wait()

    first = asyncio.create_task(restore("a"))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(restore(name)) for name in "bcde"]
    await asyncio.sleep(0)
    assert (gate.running, gate.queued) == (1, 4)
    waiters[1].cancel()  # "c" gives up while queued: it leaves the queue, nobody is skipped
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, *waiters, return_exceptions=True)
    assert order == ["a", "b", "d", "e"]
    assert (gate.running, gate.queued) == (0, 0)
    assert RestoreGate(0).bound == default_bound() >= 1


async def test_three_vms_woken_at_once_with_the_bound_at_one_all_wake_in_order(tmp_path: Path) -> None:
    settings = VmmSettings(state_dir=tmp_path, memory_reserve_mb=0, guest_sync=False, max_concurrent_restores=1)
    write_template(settings)
    fake = FakeRuntime(settings)
    manager = VmManager(settings, runtime=fake)
    await manager.start()
    try:
        ids = [(await manager.create_vm("demo")).id for _ in range(3)]
        for vm_id in ids:
            await manager.suspend(vm_id)
        fake.load_gate = asyncio.Event()
        wakes = [asyncio.create_task(manager.resume(vm_id)) for vm_id in ids]
        while len([p for p, _ in fake.loads if p == "restore"]) < 1:
            await asyncio.sleep(0)
        assert (manager.restores.running, manager.restores.queued) == (1, 2)
        assert [manager.get(v).state for v in ids] == [VmState.RESTORING, VmState.SUSPENDED, VmState.SUSPENDED]
        fake.load_gate.set()
        await asyncio.gather(*wakes)
        assert [vm_id for purpose, vm_id in fake.loads if purpose == "restore"] == ids
        assert all(manager.get(v).state is VmState.RUNNING for v in ids)
    finally:
        await manager.close()


async def test_time_in_the_restore_queue_does_not_count_against_wake_timeout() -> None:
    backend = _backend(VmState.SUSPENDED)
    backend.wake_gate = asyncio.Event()
    ctx = _context(backend, wake_timeout=0.2)
    events = Events()
    task = asyncio.create_task(reach(ctx, _exchange(False), events))
    await asyncio.sleep(0.5)  # queued (still suspended) for longer than wake_timeout
    assert not task.done()
    backend.vms[VM].state = VmState.RESTORING  # its restore starts: from here wake_timeout counts
    backend.wake_gate.set()
    await task
    assert ("woken",) in events.seen and not any(e[0] == "refused" for e in events.seen)


async def test_a_started_restore_slower_than_wake_timeout_is_refused() -> None:
    backend = _backend(VmState.RESTORING)
    backend.wake_gate = asyncio.Event()  # never set
    ctx = _context(backend, wake_timeout=0.2)
    events = Events()
    async with asyncio.timeout(2):
        await reach(ctx, _exchange(False), events)
    assert events.seen[-1][:2] == ("refused", 503)


@pytest.mark.parametrize("bound", [1, 3])
def test_the_bound_is_the_settings(bound: int) -> None:
    assert RestoreGate(bound).bound == bound


async def test_a_vm_waiting_its_turn_can_be_deleted_meanwhile(tmp_path: Path) -> None:
    settings = VmmSettings(state_dir=tmp_path, memory_reserve_mb=0, guest_sync=False, max_concurrent_restores=1)
    write_template(settings)
    fake = FakeRuntime(settings)
    manager = VmManager(settings, runtime=fake)
    await manager.start()
    try:
        first, queued = [(await manager.create_vm("demo")).id for _ in range(2)]
        for vm_id in (first, queued):
            await manager.suspend(vm_id)
        fake.load_gate = asyncio.Event()
        restoring = asyncio.create_task(manager.resume(first))
        waiting = asyncio.create_task(manager.resume(queued))
        while manager.restores.queued < 1:
            await asyncio.sleep(0)
        await manager.delete(queued)  # not held up by the restore ahead of it
        fake.load_gate.set()
        await restoring
        with pytest.raises(VmmError):
            await waiting  # its turn came: the VM is gone
        assert manager.get(first).state is VmState.RUNNING and manager.get(queued).state is VmState.TERMINATED
    finally:
        await manager.close()
