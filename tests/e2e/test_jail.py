"""Every QEMU jailed and limited, seen from the host against real guests (issue 20, items 1 and 2).

QEMU's own view (/proc/<pid>/status) for a running VM, a restored VM and a template boot; every
lifecycle step's QEMU (launch, pause, suspend, the RAM move, restore, template boot) jailed: its
uid, seccomp, mount namespace and cgroup; what its credentials reach from inside its mount namespace;
the VM's cgroup and its limits; and a guest that allocates past its memory, ended by its limit while
another VM keeps answering; two guests spinning and fork-bombing while a third answers through the edge,
the spinner then at the busy CPU weight.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import IMAGES, REPO, started_manager
from tests.e2e.edge_harness import edge_config, running_edge
from tests.e2e.guest import guest_state, qemu_pids_under, sandbox_run
from vmm import cgroups, faults, probe
from vmm.accel import choose
from vmm.manager import VmManager
from vmm.model import VmState
from vmm.settings import JailSettings, VmmSettings
from vmm.template import create as create_template

CGROUP_NAME = "microvm-edge"


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()[0] if value.split() else ""
    return fields


def assert_jailed(pid: int) -> dict[str, str]:
    status = proc_status(pid)
    assert status["Uid"] != "0" and status["Gid"] != "0", status
    assert (status["CapEff"], status["CapPrm"], status["CapBnd"]) == ("0" * 16,) * 3, status
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
    return status


def assert_step_jailed(pid: int, group: str, uid: int) -> None:
    """QEMU `pid` runs as `uid` under seccomp, in a mount namespace of its own, in the cgroup `group` only."""
    status = assert_jailed(pid)
    assert status["Uid"] == str(uid), (status["Uid"], uid)
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"), "QEMU in the host's mounts"
    groups = cgroups.detect(CGROUP_NAME)
    assert groups is not None
    for directory in groups.vm_dirs(group):
        assert str(pid) in (directory / "cgroup.procs").read_text().split(), directory
    paths = {line.split(":", 2)[2] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()}
    mine = {path for path in paths if CGROUP_NAME in path}
    assert mine and all(path.endswith(f"/{CGROUP_NAME}/vms/{group}") for path in mine), paths


def as_qemu(pid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    """`argv` inside QEMU `pid`'s mount namespace, with its uid and gid, no groups, no_new_privs."""
    status = proc_status(pid)
    cmd = ["nsenter", "-t", str(pid), "-m", "--", "setpriv", f"--reuid={status['Uid']}", f"--regid={status['Gid']}",
           "--clear-groups", "--no-new-privs", *argv]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def as_qemu_uid(pid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    """`argv` in the host's own mount namespace with QEMU `pid`'s credentials (as if its jail were gone)."""
    status = proc_status(pid)
    cmd = ["setpriv", f"--reuid={status['Uid']}", f"--regid={status['Gid']}", "--clear-groups", "--no-new-privs",
           *argv]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


async def test_running_and_restored_qemus_are_jailed_each_with_its_own_uid(manager: VmManager) -> None:
    a, b = await manager.create_vm("demo"), await manager.create_vm("demo")
    assert a.pid is not None and b.pid is not None
    status_a, status_b = assert_jailed(a.pid), assert_jailed(b.pid)
    assert status_a["Uid"] != status_b["Uid"], "two VMs share a uid"
    vm_dir = manager.vm_dir(a.id)
    st = vm_dir.stat()
    assert (str(st.st_uid), st.st_mode & 0o777) == (status_a["Uid"], 0o700)
    await manager.suspend(a.id)
    await manager.resume(a.id)
    assert a.pid is not None
    restored = assert_jailed(a.pid)
    assert restored["Uid"] == status_a["Uid"], "a restore keeps the VM's uid"
    assert (await guest_state(a.id))["counter"] == 1
    for name in ("ram", "serial.log"):
        assert ((vm_dir / name).stat().st_uid, (vm_dir / name).stat().st_mode & 0o777) == (st.st_uid, 0o600)
    for name in ("state", "qemu.log"):
        path = vm_dir / name
        if path.exists():
            assert (path.stat().st_uid, path.stat().st_mode & 0o777) == (0, 0o600), name


async def test_a_template_boot_is_jailed(settings: VmmSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    own = replace(settings, state_dir=settings.state_dir / "boot")
    own.state_dir.mkdir(mode=0o700)
    (own.state_dir / "images").symlink_to(IMAGES)
    seen: list[dict[str, str]] = []
    real_wait = probe.wait_ready

    async def wait_ready(ns_id: str, *args: Any, **kwargs: Any) -> None:
        pids = qemu_pids_under(own.templates_dir)  # the boot's QEMU runs: it is spawned before the app is awaited
        assert len(pids) == 1
        seen.append(assert_jailed(pids[0]))
        assert_step_jailed(pids[0], ns_id, int(seen[0]["Uid"]))  # its cgroup is named after its namespace
        await real_wait(ns_id, *args, **kwargs)

    monkeypatch.setattr(probe, "wait_ready", wait_ready)
    tpl = await create_template(own, "jailboot", "demo", choose(own.accelerator), lambda _: None)
    assert len(seen) == 1
    for path in (Path(tpl.path), *Path(tpl.path).iterdir()):
        st = path.stat()
        assert st.st_uid == 0 and not st.st_mode & 0o022, (path, oct(st.st_mode))  # root's, nobody else writes
    for name in ("ram", "vmlinuz", "initrd.img"):  # what clones map or load: read-only even for root's own mode
        assert not (Path(tpl.path) / name).stat().st_mode & 0o222, name


# The points inside each step at which its QEMU runs (vmm/faults.py): the launch's and the restore's once
# loaded, the suspend's when its snapshot is saved (the first suspend saves twice: the running QEMU's full
# stream, then the RAM move's device state), the RAM move's once loaded.
STEP_POINTS = {"launch.loaded": "launch", "snapshot.saved": "suspend", "ram-move.loaded": "ram move",
               "restore.loaded": "restore"}  # fmt: skip


async def test_every_lifecycle_step_runs_jailed(manager: VmManager, monkeypatch: pytest.MonkeyPatch) -> None:
    """Launch, pause, suspend, the first suspend's RAM move, restore: each QEMU looked at while its step runs."""
    seen: list[tuple[str, int]] = []
    failures: list[tuple[str, AssertionError]] = []  # raised in the manager, they would fail the step, not the test
    real_point = faults.point

    def point(name: str) -> None:
        if name in STEP_POINTS:
            pids = qemu_pids_under(manager.settings.state_dir)
            assert len(pids) == 1, (name, pids)
            argv = Path(f"/proc/{pids[0]}/cmdline").read_bytes().split(b"\0")
            vm_id = argv[argv.index(b"-name") + 1].decode().removeprefix("mvm-")
            seen.append((STEP_POINTS[name], pids[0]))
            try:
                assert_step_jailed(pids[0], vm_id, manager.vm_dir(vm_id).stat().st_uid)
            except AssertionError as exc:
                failures.append((STEP_POINTS[name], exc))
        real_point(name)

    monkeypatch.setattr(faults, "point", point)
    vm = await manager.create_vm("demo")
    uid = manager.vm_dir(vm.id).stat().st_uid
    await manager.pause(vm.id)
    assert vm.state is VmState.PAUSED and vm.pid is not None
    seen.append(("pause", vm.pid))
    assert_step_jailed(vm.pid, vm.id, uid)
    await manager.suspend(vm.id)  # the first: the paused QEMU's full stream, then the RAM move
    await manager.resume(vm.id)
    assert not failures, failures
    assert [step for step, _ in seen] == ["launch", "pause", "suspend", "ram move", "suspend", "restore"]
    launched, paused, suspended, moved, moved_saves, restored = (pid for _, pid in seen)
    assert launched == paused == suspended and moved == moved_saves, seen
    assert len({launched, moved, restored}) == 3, "each QEMU of its own step"
    assert (await guest_state(vm.id))["counter"] == 1, "the guest runs on after every step"


async def test_what_a_qemu_can_reach(manager: VmManager, sandbox_template: str) -> None:
    a = await manager.create_vm(sandbox_template)
    b = await manager.create_vm(sandbox_template)
    await manager.suspend(b.id)
    await manager.resume(b.id)  # b now has its own RAM file and an overlay
    assert a.pid is not None and b.pid is not None
    state = manager.settings.state_dir
    keys = state / "keys"
    keys.mkdir(mode=0o700)
    (keys / "token-signing.pem").write_text("not for guests")
    os.chmod(keys / "token-signing.pem", 0o600)
    b_dir = manager.vm_dir(b.id)
    secrets = [b_dir / "ram", b_dir / "disk.qcow2", b_dir / "agent.key", state / "registry.sqlite3",
               keys / "token-signing.pem", Path("/etc/shadow")]  # fmt: skip
    tls_key = REPO / "var" / "tls" / "dev.key"
    if tls_key.exists():
        secrets.append(tls_key)
    for path in secrets:
        assert path.exists(), path
        inside = as_qemu(a.pid, "cat", str(path))
        assert inside.returncode != 0 and "No such file or directory" in inside.stderr, (path, inside)
        outside = as_qemu_uid(a.pid, "head", "-c", "1", str(path))  # even with its jail gone, its uid cannot
        assert outside.returncode != 0 and "Permission denied" in outside.stderr, (path, outside)
    own = as_qemu(a.pid, "head", "-c", "3", str(manager.vm_dir(a.id) / "disk.qcow2"))
    assert own.returncode == 0 and own.stdout == "QFI", own  # its own overlay: yes
    listing = as_qemu(a.pid, "ls", "-A", "/")
    assert listing.returncode == 0, listing
    tpl_dir = manager.settings.templates_dir / sandbox_template
    top = {Path(p).parts[1] for p in (os.getcwd(), os.path.abspath(manager.vm_dir(a.id)), tpl_dir.resolve())}
    shim = {"mvm"}  # a launched clone maps its template's RAM: the QEMU 7.2 shim (vmm/native/private_ram.c)
    assert set(listing.stdout.split()) == {"bin", "dev", "lib", "lib64", "proc", "sbin", "usr"} | top | shim
    devices = as_qemu(a.pid, "ls", "-A", "/dev")
    assert set(devices.stdout.split()) == {"null", "zero", "random", "urandom"}  # no /dev/kvm under TCG, no tun
    vms = as_qemu(a.pid, "ls", "-A", os.path.abspath(manager.settings.vms_dir))
    assert vms.stdout.split() == [a.id], "another VM's directory is in the jail"
    templates = as_qemu(a.pid, "ls", "-A", os.path.abspath(manager.settings.templates_dir))
    assert templates.stdout.split() == [sandbox_template]
    write = as_qemu(a.pid, "sh", "-c", f"echo x >> {Path(manager.settings.templates_dir / sandbox_template).absolute()}"
                    "/disk.base")  # fmt: skip
    assert write.returncode != 0, "the template's base disk is writable from a VM's jail"
    procs = as_qemu(a.pid, "ls", "/proc")
    assert str(b.pid) not in procs.stdout.split(), "another VM's QEMU is visible in /proc"


async def test_the_vm_group_holds_its_limits_after_launch_and_restore(manager: VmManager) -> None:
    groups = cgroups.detect(CGROUP_NAME)
    assert groups is not None
    vm = await manager.create_vm("demo", policy={"cpu_share": 0.5})
    tpl = manager.templates()[0]
    overhead = manager.settings.jail.memory_overhead_mb
    for step in ("launch", "restore"):
        assert vm.pid is not None
        limits = groups.read_limits(vm.id)
        assert limits.cpu_quota_us == tpl.vcpus * 50_000, step
        assert limits.memory_mb == tpl.memory_mb + overhead, step
        assert limits.pids_max == manager.settings.jail.pids_max, step
        for directory in groups.vm_dirs(vm.id):
            assert str(vm.pid) in (directory / "cgroup.procs").read_text().split(), (step, directory)
        await manager.suspend(vm.id)
        await manager.resume(vm.id)
    await manager.delete(vm.id)
    assert not any(d.exists() for d in groups.vm_dirs(vm.id))


def tighten_memory(groups: cgroups.Cgroups, group: str, headroom_mb: int) -> int:
    """Lower the group's memory limit to what it uses now plus `headroom_mb`; returns the limit in MiB.

    With the configured limit (guest RAM + QEMU's overhead) a guest cannot pass it by allocating
    inside its RAM; the tighter limit stands for a QEMU that grows past its share.
    """
    directory = next(d for d in groups.vm_dirs(group) if "memory" in str(d) or groups.version == 2)
    usage_file, limit_file = (
        ("memory.usage_in_bytes", "memory.limit_in_bytes") if groups.version == 1 else ("memory.current", "memory.max")
    )
    limit_mb = (int((directory / usage_file).read_text()) >> 20) + headroom_mb
    (directory / limit_file).write_text(str(limit_mb << 20))
    return limit_mb


async def test_a_guest_past_its_memory_is_ended_by_its_limit(manager: VmManager, sandbox_template: str) -> None:
    groups = cgroups.detect(CGROUP_NAME)
    assert groups is not None
    hog = await manager.create_vm(sandbox_template)
    quiet = await manager.create_vm("demo")
    assert await sandbox_run(hog.id, "1 + 1") == 2
    assert (await guest_state(quiet.id))["counter"] == 1
    limit_mb = tighten_memory(groups, hog.id, 96)
    with pytest.raises((OSError, asyncio.IncompleteReadError, ValueError)):
        await sandbox_run(hog.id, "x = b'1' * (256 << 20); len(x)", timeout=120)
    async with asyncio.timeout(30):
        while hog.state is not VmState.FAILED:
            await asyncio.sleep(0.05)
    assert hog.reason == f"out of memory: cgroup limit {limit_mb} MiB"
    assert manager.vm_dir(hog.id).exists(), "a failed VM's directory is kept for inspection"
    assert not any(d.exists() for d in groups.vm_dirs(hog.id)), "its reason is read: its cgroup is gone"
    assert (await guest_state(quiet.id))["counter"] == 2, "the other VM answers on"
    await manager.delete(hog.id)
    assert not manager.vm_dir(hog.id).exists()


async def test_spinning_and_fork_bombing_guests_leave_another_vm_answering_through_the_edge(
    settings: VmmSettings, sandbox_template: str
) -> None:
    async with running_edge(edge_config(settings)) as client:
        quiet = await client.create_vm()
        token = await client.token(quiet)
        assert (await client.get_json(quiet, token))["counter"] == 1
        busy = [
            (await client.api("POST", "/v1/vms", {"template": sandbox_template}, status=201))["id"] for _ in range(2)
        ]
        groups = cgroups.detect(CGROUP_NAME)
        assert groups is not None
        for vm_id in busy:
            assert groups.read_limits(vm_id).cpu_quota_us == 100_000  # one vCPU each: one CPU at most
        # Every vCPU of one guest spins; the other guest forks without end. Neither request ever answers.
        loads = [
            asyncio.create_task(sandbox_run(busy[0], "while True: pass", timeout=600)),
            asyncio.create_task(sandbox_run(busy[1], "import os\nwhile True:\n    os.fork()", timeout=600)),
        ]
        try:
            await asyncio.sleep(0)  # both requests are on their way before the quiet VM is asked
            for n in range(20):
                assert (await client.get_json(quiet, token))["counter"] == n + 2
            assert not loads[0].done(), "the spinning guest stopped"  # the fork bomb may end in its guest's OOM
            # Spinning past jail.busy_after, the spinner runs at the busy CPU weight; the quiet VM, idle now,
            # at the normal one (while it answered back to back on a crowded host it may have been busy too).
            wanted = {busy[0]: JailSettings().busy_cpu_weight, quiet: cgroups.VM_CPU_WEIGHT}
            deadline = time.monotonic() + 60
            while {vm: groups.cpu_weight(vm) for vm in wanted} != wanted and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert {vm: groups.cpu_weight(vm) for vm in wanted} == wanted
        finally:
            for task in loads:
                task.cancel()
            await asyncio.gather(*loads, return_exceptions=True)


def _left_group(groups: cgroups.Cgroups, name: str, owner: Path) -> None:
    """An empty group as a manager of `owner` leaves one when its QEMU outlived the VM's release."""
    made = time.time() - cgroups.GROUP_GRACE - 5
    for directory in groups.vm_dirs(name):
        directory.mkdir()
        os.setxattr(directory, cgroups.OWNER_XATTR, str(owner).encode())
        os.utime(directory, (made, made))


async def test_a_starting_manager_sweeps_groups_left_by_its_state_dir_and_by_one_gone(
    settings: VmmSettings, tmp_path: Path
) -> None:
    groups = cgroups.detect(CGROUP_NAME)
    assert groups is not None
    groups.setup(settings.jail.host_cpu_weight, None)
    live_other = tmp_path / "another-state-dir"  # a fleet host on this machine: its groups are its own
    live_other.mkdir()
    suffix = os.urandom(3).hex()
    left = {"mine": f"vleft{suffix}", "gone": f"vgone{suffix}", "other": f"vother{suffix}"}
    _left_group(groups, left["mine"], settings.state_dir.resolve())
    _left_group(groups, left["gone"], tmp_path / "a-removed-state-dir")
    _left_group(groups, left["other"], live_other)
    try:
        async with started_manager(settings):
            present = {k for k, name in left.items() if any(d.exists() for d in groups.vm_dirs(name))}
            assert present == {"other"}
    finally:
        groups.remove(left["other"])
