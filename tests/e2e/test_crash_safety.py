"""Faults inside transitions, against real guests: a killed manager, registry write failures, a full disk.

Every fault is injected at a named point (vmm.faults) or by a filesystem the test makes
full, never by timing. After each one the guest's in-memory counter continues, or the VM
says why it cannot, and no QEMU is left that nobody manages.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO
from tests.e2e.guest import guest_state, pid_alive
from vmm import faults
from vmm.errors import OverCapacity, RegistryError, RestoreFailed
from vmm.manager import VmManager
from vmm.model import RamMode, VmState
from vmm.qemu import qemus_by_name
from vmm.settings import VmmSettings

TEMP_FILES = {"state.tmp", "state.dev", "state.dev.sha256", "state.sha256.tmp", "state.dev.tmp"}


def qemus_of(vm_id: str) -> list[int]:
    return qemus_by_name().get(f"mvm-{vm_id}", [])


async def started(settings: VmmSettings) -> VmManager:
    manager = VmManager(settings)
    await manager.start()
    return manager


async def close_after_deleting_all(manager: VmManager) -> None:
    for rec in list(manager.list_vms()):
        await manager.delete(rec.id)
    await manager.close()


@pytest.fixture(autouse=True)
def no_faults_left() -> Iterator[None]:
    yield
    faults.disarm_all()


# (what the dead manager was doing, where it died, what the next manager finds)
KILL_POINTS = [
    ("suspend", "snapshot.saved", VmState.PAUSED),  # stream written, not yet complete: its QEMU is kept
    ("suspend", "suspend.saved", VmState.SUSPENDED),  # snapshot complete, the VM's QEMU still there
    ("suspend", "ram-move.spawned", VmState.SUSPENDED),  # a second QEMU, moving RAM, holds the tap
    ("suspend", "ram-move.loaded", VmState.SUSPENDED),
    ("suspend", "suspend.ram_moved", VmState.SUSPENDED),  # device state saved, not yet renamed
    ("wake", "restore.spawned", VmState.SUSPENDED),
    ("wake", "restore.loaded", VmState.SUSPENDED),
    ("wake", "restore.recorded", VmState.PAUSED),  # recorded as running, `cont` not yet sent
]


@pytest.mark.parametrize(("action", "point", "recovered"), KILL_POINTS, ids=[p for _, p, _ in KILL_POINTS])
async def test_manager_killed_inside_a_transition_loses_nothing(
    settings: VmmSettings, action: str, point: str, recovered: VmState
) -> None:
    first = await started(settings)
    try:
        vm = await first.create_vm("demo")
        before = await guest_state(vm.id)
        if action == "wake":
            await first.suspend(vm.id)
    finally:
        await first.close()
    env = {**os.environ, faults.ENV: f"{point}=kill"}
    dead = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.e2e.manager_proc", str(settings.state_dir), action, vm.id, cwd=REPO, env=env
    )
    assert await asyncio.wait_for(dead.wait(), 120) == -signal.SIGKILL, f"the manager did not reach {point}"
    second = await started(settings)
    try:
        rec = second.get(vm.id)
        assert rec.state is recovered, rec.reason
        assert qemus_of(vm.id) == ([rec.pid] if recovered is VmState.PAUSED else []), "no orphan QEMU is left"
        assert not TEMP_FILES & set(os.listdir(second.vm_dir(vm.id))), "temporary files are tidied"
        await second.ensure_running(vm.id)
        after = await guest_state(vm.id)
        assert (after["boot_id"], after["counter"]) == (before["boot_id"], before["counter"] + 1)
        await second.suspend(vm.id)
        await second.ensure_running(vm.id)
        assert (await guest_state(vm.id))["counter"] == before["counter"] + 2, "the next cycle works too"
    finally:
        await close_after_deleting_all(second)
    assert qemus_of(vm.id) == []


async def test_delete_ends_every_qemu_of_the_vm(manager: VmManager, tmp_path: Path) -> None:
    vm = await manager.create_vm("demo")
    stray = subprocess.Popen(
        [manager.settings.qemu_binary, "-name", f"mvm-{vm.id}", "-machine", "none", "-S", "-nodefaults",
         "-display", "none", "-monitor", "none", "-serial", "none"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        runner = vm.pid
        async with asyncio.timeout(10):  # until the stray's exec shows in /proc
            while sorted(qemus_of(vm.id)) != sorted([runner, stray.pid]):
                await asyncio.sleep(0.01)
        await manager.delete(vm.id)
        stray.wait(timeout=10)  # the manager reaped it already (it is the test's child): its status is lost
        assert qemus_of(vm.id) == [] and not pid_alive(runner), "every QEMU running as the VM is ended with it"
        assert manager.get(vm.id).state is VmState.TERMINATED, "the record stays for a while"
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()


async def test_registry_write_failure_undoes_the_transition(manager: VmManager) -> None:
    vm = await manager.create_vm("demo")
    before = await guest_state(vm.id)
    faults.arm("registry.save", "raise")
    with pytest.raises(RegistryError, match="stays running") as caught:
        await manager.suspend(vm.id)
    assert caught.value.http_status == 507
    assert vm.state is VmState.RUNNING, "undone in memory too, not left suspending"
    assert (await guest_state(vm.id))["counter"] == before["counter"] + 1
    faults.disarm_all()
    await manager.suspend(vm.id)
    faults.arm("registry.save", "raise")
    with pytest.raises(RegistryError, match="stays suspended"):
        await manager.ensure_running(vm.id)
    assert vm.state is VmState.SUSPENDED and qemus_of(vm.id) == []
    faults.disarm_all()
    await manager.ensure_running(vm.id)
    assert (await guest_state(vm.id))["counter"] == before["counter"] + 2


@pytest.fixture
async def small_disk(settings: VmmSettings) -> AsyncIterator[VmmSettings]:
    """The VM directories on a 512 MiB tmpfs the test can fill; unmounted whatever happens."""
    mount = settings.state_dir / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        for name in ("images", "templates"):
            (mount / name).symlink_to((settings.state_dir / name).resolve())
        yield replace(settings, state_dir=mount)
    finally:
        for pid in [p for pids in qemus_by_name().values() for p in pids]:
            if str(mount).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path, leave: int) -> None:
    """Write a file that leaves `leave` bytes free on path's filesystem."""
    free = os.statvfs(path.parent).f_bavail * os.statvfs(path.parent).f_frsize
    with path.open("wb") as f:
        chunk = b"\xa5" * (1 << 20)
        for _ in range(max(0, free - leave) >> 20):
            f.write(chunk)


async def test_full_disk_refuses_the_suspend_and_the_vm_keeps_running(small_disk: VmmSettings) -> None:
    manager = await started(small_disk)
    try:
        vm = await manager.create_vm("demo")
        before = await guest_state(vm.id)
        filler = small_disk.state_dir / "filler"
        fill(filler, 8 << 20)
        with pytest.raises(OverCapacity, match="not enough disk space to suspend") as caught:
            await manager.suspend(vm.id)
        assert caught.value.http_status == 507
        assert vm.state is VmState.RUNNING and vm.pid is not None and pid_alive(vm.pid)
        assert (await guest_state(vm.id))["counter"] == before["counter"] + 1
        filler.unlink()
        await manager.suspend(vm.id)
        assert vm.ram_mode is RamMode.OWN_FILE
        await manager.ensure_running(vm.id)
        assert (await guest_state(vm.id))["counter"] == before["counter"] + 2
    finally:
        await close_after_deleting_all(manager)


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


async def test_corrupt_snapshot_bytes_are_refused_and_kept(settings: VmmSettings) -> None:
    manager = await started(replace(settings, verify_ram=True))
    try:
        vm = await manager.create_vm("demo")
        before = await guest_state(vm.id)
        await manager.suspend(vm.id)
        vm_dir = manager.vm_dir(vm.id)
        state, ram = vm_dir / "state", vm_dir / "ram"
        size = state.stat().st_size
        with ram.open("rb") as f:
            data_at = os.lseek(f.fileno(), 0, os.SEEK_DATA)
        damage = [(state, 0), (state, 17), (state, size // 2), (state, size - 1), (ram, data_at + 4097)]
        for path, offset in damage:
            flip_byte(path, offset)
            with pytest.raises(RestoreFailed, match="does not match its checksum"):
                await manager.ensure_running(vm.id)
            assert vm.state is VmState.SUSPENDED and "checksum" in (vm.reason or "")
            assert qemus_of(vm.id) == [], "nothing was loaded"
            assert path.exists(), "the damaged file is kept for inspection"
            flip_byte(path, offset)
        await manager.ensure_running(vm.id)
        assert (await guest_state(vm.id))["counter"] == before["counter"] + 1
    finally:
        await close_after_deleting_all(manager)
