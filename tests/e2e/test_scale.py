"""Many VMs on one machine (issue 17), small counts: the bounded restore queue serves every queued
wake in order; a reflinked RAM file (XFS) costs disk for the pages the guest changed. Both run on one
loop-mounted XFS state directory, where a suspend writes no RAM. Scale cases (hundreds of VMs, 50 wakes
at once) are in bench/scale_bench.py; the lifecycle on the default state directory is test_vmm_lifecycle's."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import IMAGES, started_manager
from tests.e2e.edge_harness import bearer, edge_config, running_edge
from tests.e2e.guest import guest_state, qemu_pids_under
from vmm.model import RamMode, VmState
from vmm.network import netns
from vmm.settings import VmmSettings

XFS_SIZE = 1 << 30  # sparse: only what is written takes space
PAGE = 4096
SLACK = 4 << 20  # the filesystem's own metadata, the logs


async def test_three_wakes_at_once_with_one_restore_at_a_time_are_all_answered_in_order(
    xfs_settings: VmmSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = edge_config(replace(xfs_settings, max_concurrent_restores=1), wake_timeout=30.0)
    async with running_edge(cfg) as client:
        manager = client.edge.manager
        ids = [await client.create_vm() for _ in range(3)]
        tokens = [await client.token(vm_id) for vm_id in ids]
        for vm_id in ids:
            await client.api("POST", f"/v1/vms/{vm_id}/suspend", status=200)
        restored: list[str] = []
        first_may_go = asyncio.Event()
        real_load = manager.runtime.load

        async def load(vm: Any, *args: Any, **kwargs: Any) -> None:
            if args[4] == "restore":  # purpose
                restored.append(vm.rec.id)
                if len(restored) == 1:
                    await first_may_go.wait()  # the first restore holds the one slot until the others queue
            await real_load(vm, *args, **kwargs)

        monkeypatch.setattr(manager.runtime, "load", load)

        async def fetch(vm_id: str, token: str) -> tuple[int, Any]:
            async with client.session.get(client.vm_url(vm_id), headers=bearer(token)) as resp:
                return resp.status, await resp.json()

        tasks = []
        async with asyncio.timeout(30):
            for n, (vm_id, token) in enumerate(zip(ids, tokens, strict=True)):
                tasks.append(asyncio.create_task(fetch(vm_id, token)))
                while len(restored) + manager.restores.queued < n + 1:  # this wake has reached the gate
                    await asyncio.sleep(0.01)
        assert (manager.restores.running, manager.restores.queued) == (1, 2)
        assert [manager.get(v).state for v in ids] == [VmState.RESTORING, VmState.SUSPENDED, VmState.SUSPENDED]
        first_may_go.set()
        answers = await asyncio.gather(*tasks)
        assert [status for status, _ in answers] == [200, 200, 200]
        assert [body["counter"] for _, body in answers] == [1, 1, 1]
        assert restored == ids, "queued wakes are served in the order they asked"


@pytest.fixture(scope="module")
def xfs_settings(session_root: Path, template_dir: Path) -> Iterator[VmmSettings]:
    """A state directory on a loop-mounted XFS (reflinks) made once for this module and removed after it,
    with a copy of the session's demo template (a reflink needs the template's RAM file on the same
    filesystem). Its VMs suspend without writing RAM, which keeps these tests cheap."""
    if shutil.which("mkfs.xfs") is None:
        pytest.fail("mkfs.xfs missing: run scripts/install.sh (installs xfsprogs)")
    image, mount = session_root / "xfs.img", session_root / "xfs"
    with open(image, "wb") as f:
        f.truncate(XFS_SIZE)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    mount.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    state = mount / "state"
    try:
        state.mkdir(mode=0o700)
        (state / "images").symlink_to(IMAGES)
        (state / "templates").mkdir()
        copy = ["cp", "-a", "--sparse=always", str(template_dir / "demo"), str(state / "templates")]
        subprocess.run(copy, check=True)
        yield replace(VmmSettings(), state_dir=state, clone_ram="reflink")
    finally:
        qemus = qemu_pids_under(state)
        for pid in qemus:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for vm_dir in (state / "vms").iterdir() if (state / "vms").exists() else []:
            asyncio.run(netns.delete(vm_dir.name))
        for _ in range(100):  # bounded: a killed QEMU lets go of its files within moments
            if subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0:
                break
            time.sleep(0.05)
        mount.rmdir()
        image.unlink()


def _used(path: Path) -> int:
    """Bytes in use on the filesystem of `path`, after its dirty pages are written back (that one only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        ctypes.CDLL(None, use_errno=True).syncfs(fd)
    finally:
        os.close(fd)
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _changed_bytes(ram: Path, template_ram: Path) -> int:
    """Bytes of 4 KiB pages in which the VM's RAM file differs from its template's."""
    changed = 0
    with open(ram, "rb") as a, open(template_ram, "rb") as b:
        while block := a.read(PAGE):
            changed += PAGE if block != b.read(PAGE) else 0
    return changed


async def test_a_reflinked_ram_file_costs_disk_for_the_changed_pages_and_keeps_state(
    xfs_settings: VmmSettings,
) -> None:
    state = xfs_settings.state_dir
    before = _used(state)
    async with started_manager(xfs_settings) as manager:
        vm = await manager.create_vm("demo")
        assert vm.ram_mode is RamMode.OWN_FILE, "the VM owns its (reflinked) RAM file from launch"
        first = await guest_state(vm.id)
        for _ in range(2):  # the first suspend costs what later ones cost: device state only
            await manager.suspend(vm.id)
            assert (manager.vm_dir(vm.id) / "state").stat().st_size < 1024**2
            await manager.ensure_running(vm.id)
        again = await guest_state(vm.id)
        assert (again["boot_id"], again["counter"]) == (first["boot_id"], first["counter"] + 1)
        await manager.suspend(vm.id)
        vm_dir, template_ram = manager.vm_dir(vm.id), state / "templates" / "demo" / "ram"
        grown = _used(state) - before
        changed = _changed_bytes(vm_dir / "ram", template_ram)
        others = sum(p.stat().st_blocks * 512 for p in vm_dir.iterdir() if p.name != "ram" and p.is_file())
        touched = template_ram.stat().st_blocks * 512
        print(f"reflink: disk grown {grown} B, pages changed {changed} B, other files {others} B")
        assert grown <= 1.5 * changed + others + SLACK, (grown, changed, others)
        assert grown < touched / 2, "a fraction of what the guest touched, not all of it"
        await manager.ensure_running(vm.id)
        assert (await guest_state(vm.id))["counter"] == first["counter"] + 2
