"""The VM plane against real QEMU guests: clone, pause, suspend/restore, failures, restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.guest import count_restores, guest_state, pid_alive
from vmm.errors import Conflict, RestoreFailed, VmmError
from vmm.manager import VmManager
from vmm.model import RamMode, VmState
from vmm.network import netns
from vmm.settings import VmmSettings


async def test_three_clones_start_from_template_with_independent_state(manager: VmManager) -> None:
    vms = [await manager.create_vm("demo") for _ in range(3)]
    first = [await guest_state(vm.id) for vm in vms]
    second = [await guest_state(vm.id) for vm in vms]
    boot_ids = {s["boot_id"] for s in first}
    assert len(boot_ids) == 1, "every clone continues the template's boot"
    assert [s["counter"] for s in first] == [1, 1, 1]
    assert [s["counter"] for s in second] == [2, 2, 2]
    assert all(vm.state is VmState.RUNNING and vm.ram_mode is RamMode.TEMPLATE_COW for vm in vms)


async def test_suspend_ends_qemu_and_restore_keeps_memory(manager: VmManager) -> None:
    vm = await manager.create_vm("demo")
    before = await guest_state(vm.id)
    for round_no in range(2):  # first from the copy-on-write clone, then from the VM's own RAM file
        pid = vm.pid
        assert pid is not None
        await manager.suspend(vm.id)
        assert vm.state is VmState.SUSPENDED and vm.pid is None
        assert not pid_alive(pid), "suspend must end the QEMU process and free its memory"
        assert vm.ram_mode is RamMode.OWN_FILE, "RAM left the copy-on-write mapping at suspend"
        assert (manager.vm_dir(vm.id) / "state").stat().st_size < 1024**2, "a wake loads device state only"
        assert not netns.exists(vm.id), "a suspended VM costs disk only: no namespace, no tap"
        assert not _open_files_under(manager.vm_dir(vm.id)), "nor an open file"
        assert await manager.ensure_running(vm.id) is True
        assert netns.exists(vm.id), "its namespace is made again at wake"
        after = await guest_state(vm.id)
        assert after["boot_id"] == before["boot_id"], "restored, not rebooted"
        assert after["counter"] == before["counter"] + 1 + round_no
        assert after["uptime"] > before["uptime"]
        assert vm.ram_mode is RamMode.OWN_FILE


def _open_files_under(directory: Path) -> list[str]:
    """Files under `directory` this process holds open."""
    inside = str(directory.resolve())
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith(inside):
                found.append(target)
    return found


async def test_pause_and_resume_in_memory(manager: VmManager) -> None:
    vm = await manager.create_vm("demo")
    before = await guest_state(vm.id)
    pid = vm.pid
    await manager.pause(vm.id)
    assert vm.state is VmState.PAUSED
    await manager.resume(vm.id)
    after = await guest_state(vm.id)
    assert vm.state is VmState.RUNNING and vm.pid == pid
    assert (after["boot_id"], after["counter"]) == (before["boot_id"], before["counter"] + 1)


async def test_twenty_concurrent_wakes_cause_one_restore(manager: VmManager, monkeypatch: pytest.MonkeyPatch) -> None:
    vm = await manager.create_vm("demo")
    await guest_state(vm.id)
    await manager.suspend(vm.id)
    restores = count_restores(manager, monkeypatch)
    woke = await asyncio.gather(*(manager.ensure_running(vm.id) for _ in range(20)))
    assert restores() == 1
    assert all(woke) and vm.state is VmState.RUNNING
    assert (await guest_state(vm.id))["counter"] == 2


async def test_killed_qemu_marks_vm_failed_with_reason(manager: VmManager) -> None:
    vm = await manager.create_vm("demo")
    assert vm.pid is not None
    os.kill(vm.pid, signal.SIGKILL)
    async with asyncio.timeout(10):
        while vm.state is not VmState.FAILED:
            await asyncio.sleep(0.05)
    assert vm.reason is not None and "SIGKILL" in vm.reason
    with pytest.raises(Exception, match="has failed"):
        await manager.ensure_running(vm.id)


async def test_corrupt_snapshot_fails_restore_and_loses_nothing(manager: VmManager) -> None:
    vm = await manager.create_vm("demo")
    other = await manager.create_vm("demo")
    before = await guest_state(vm.id)
    await manager.suspend(vm.id)
    state_file = manager.vm_dir(vm.id) / "state"
    good = state_file.read_bytes()
    state_file.write_bytes(good[: len(good) // 2] + b"\xde\xad\xbe\xef" * 64)
    with pytest.raises(RestoreFailed, match="stays suspended"):
        await manager.ensure_running(vm.id)
    assert vm.state is VmState.SUSPENDED and vm.reason and "restore failed" in vm.reason
    assert vm.pid is None
    assert (await guest_state(other.id))["counter"] == 1, "other VMs are untouched"
    state_file.write_bytes(good)
    await manager.ensure_running(vm.id)
    after = await guest_state(vm.id)
    assert (after["boot_id"], after["counter"]) == (before["boot_id"], before["counter"] + 1)


async def test_a_damaged_snapshot_of_a_later_suspend_is_refused_too(manager: VmManager) -> None:
    """The second suspend saves device state only, after a QEMU that ran: its restore is refused
    the same way (it used to take that earlier QEMU's run for this one's and fail the VM)."""
    vm = await manager.create_vm("demo")
    before = await guest_state(vm.id)
    await manager.suspend(vm.id)
    await manager.ensure_running(vm.id)
    await manager.suspend(vm.id)
    state_file = manager.vm_dir(vm.id) / "state"
    good = state_file.read_bytes()
    state_file.write_bytes(b"\xde\xad\xbe\xef" + good[4:])
    with pytest.raises(RestoreFailed, match="stays suspended"):
        await manager.ensure_running(vm.id)
    assert vm.state is VmState.SUSPENDED and state_file.exists()
    state_file.write_bytes(good)
    await manager.ensure_running(vm.id)
    after = await guest_state(vm.id)
    assert (after["boot_id"], after["counter"]) == (before["boot_id"], before["counter"] + 1)


async def test_restarted_manager_lists_readopts_and_wakes(settings: VmmSettings) -> None:
    first = VmManager(settings)
    await first.start()
    try:
        asleep = await first.create_vm("demo")
        awake = await first.create_vm("demo")
        sleep_state = await guest_state(asleep.id)
        await guest_state(awake.id)
        await first.suspend(asleep.id)
        awake_pid = awake.pid
    finally:
        await first.close()
    second = VmManager(settings)
    await second.start()
    try:
        listed = {rec.id: rec.state for rec in second.list_vms()}
        assert listed == {asleep.id: VmState.SUSPENDED, awake.id: VmState.RUNNING}
        assert not netns.exists(asleep.id) and netns.exists(awake.id)
        assert second.get(awake.id).pid == awake_pid, "running QEMU re-adopted, not restarted"
        assert (await guest_state(awake.id))["counter"] == 2
        await second.ensure_running(asleep.id)
        woke = await guest_state(asleep.id)
        assert (woke["boot_id"], woke["counter"]) == (sleep_state["boot_id"], sleep_state["counter"] + 1)
        await second.pause(awake.id)
        assert second.get(awake.id).state is VmState.PAUSED
    finally:
        for rec in list(second.list_vms()):
            await second.delete(rec.id)
        await second.close()


async def test_namespace_isolates_guest_and_delete_removes_everything(manager: VmManager) -> None:
    vm = await manager.create_vm("demo")
    ns = netns.ns_name(vm.id)
    links = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines()) == ["lo", "tap0"]
    routes = subprocess.run(["ip", "-n", ns, "route"], capture_output=True, text=True, check=True).stdout
    assert routes.split()[0] == "10.77.0.0/24" and "default" not in routes, "no way out of the namespace"
    forward = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/proc/sys/net/ipv4/ip_forward"], capture_output=True, text=True
    )
    assert forward.stdout.strip() == "0"
    pid, vm_dir = vm.pid, manager.vm_dir(vm.id)
    assert pid is not None
    await manager.delete(vm.id)
    assert not pid_alive(pid) and not netns.exists(vm.id) and not vm_dir.exists()
    assert manager.lookup(vm.id) is None


async def test_second_manager_on_the_same_state_dir_is_refused(manager: VmManager, settings: VmmSettings) -> None:
    vm = await manager.create_vm("demo")
    intruder = VmManager(settings)
    with pytest.raises(Conflict, match="in use by pid"):
        await intruder.start()
    assert vm.state is VmState.RUNNING and pid_alive(vm.pid or 0)
    assert (await guest_state(vm.id))["counter"] == 1, "the first manager's VM is untouched"


async def test_failed_suspend_leaves_the_vm_running(manager: VmManager) -> None:
    vm = await manager.create_vm("demo")
    blocker = manager.vm_dir(vm.id) / "state.tmp"
    blocker.mkdir()  # the snapshot file cannot be created
    with pytest.raises(VmmError, match=r"suspend of VM .* failed, it stays running"):
        await manager.suspend(vm.id)
    assert vm.state is VmState.RUNNING
    assert (await guest_state(vm.id))["counter"] == 1
    blocker.rmdir()
    await manager.suspend(vm.id)
    await manager.ensure_running(vm.id)
    assert (await guest_state(vm.id))["counter"] == 2
