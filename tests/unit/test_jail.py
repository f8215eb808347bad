"""The jail's parts that need no QEMU: uid leases, the QEMU 7.2 shim, file ownership,
and the start-up checks that refuse a bad host set-up with one line."""

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.unit.fake_runtime import write_template
from vmm import jail, runtime, template
from vmm.accel import Accelerator, choose
from vmm.cgroups import CgroupsV2
from vmm.confine import Bind, Confinement, Jail
from vmm.errors import VmmError
from vmm.jail import UidLeases, _own, _qemu_files, check_setup
from vmm.live import LiveVm
from vmm.model import VmRecord, VmState
from vmm.policy import Policy
from vmm.qemu import MachineSpec, RamBacking
from vmm.records import RecordStore
from vmm.settings import JailSettings, VmmSettings

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


def _leases(tmp_path: Path, count: int = 3) -> UidLeases:
    return UidLeases(JailSettings(uid_start=500_000, uid_count=count, lease_dir=tmp_path / "leases"))


def test_each_directory_gets_its_own_uid_and_keeps_it(tmp_path: Path) -> None:
    leases = _leases(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    uid_a, uid_b = leases.claim(a), leases.claim(b)
    assert (uid_a, uid_b) == (500_000, 500_001)
    assert leases.claim(a) == uid_a  # asked again (a restore, a restart): the same uid
    assert leases.holder(uid_a) == str(a)


@needs_root
def test_a_restarted_manager_readopts_the_uid_its_directory_has(tmp_path: Path) -> None:
    leases = _leases(tmp_path)
    vm = tmp_path / "vm"
    vm.mkdir()
    os.chown(vm, 500_002, 500_002)
    assert leases.claim(vm) == 500_002
    other = tmp_path / "moved-in"
    other.mkdir()
    os.chown(other, 500_002, 500_002)  # files from another host with a uid this host gave away: a new one
    assert leases.claim(other) == 500_000


def test_release_frees_the_uid_and_an_exhausted_range_says_which_key(tmp_path: Path) -> None:
    leases = _leases(tmp_path, count=1)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    uid = leases.claim(a)
    with pytest.raises(VmmError, match=r"^no free uid left in jail\.uid_start=500000 .*raise jail\.uid_count$"):
        leases.claim(b)
    leases.release(a, uid)
    assert leases.claim(b) == uid


def test_a_stale_lease_is_taken_over_only_after_its_grace(tmp_path: Path) -> None:
    leases = _leases(tmp_path, count=1)
    gone = tmp_path / "gone"
    gone.mkdir()
    uid = leases.claim(gone)
    gone.rmdir()  # its VM was removed without a release (a crash)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(VmmError):
        leases.claim(fresh)  # a young lease may belong to a directory not yet chowned
    old = time.time() - jail.LEASE_GRACE - 1
    os.utime(tmp_path / "leases" / str(uid), (old, old))
    assert leases.claim(fresh) == uid


def test_the_shim_opens_only_the_named_ram_file_read_only(tmp_path: Path) -> None:
    shim = jail.build_native("private_ram.c", tmp_path / "lib", shared=True)
    assert jail.build_native("private_ram.c", tmp_path / "lib", shared=True) == shim  # once per source version
    ram, other = tmp_path / "ram", tmp_path / "other"
    ram.write_bytes(b"template")
    other.write_bytes(b"other")
    probe = (
        "import fcntl, os, sys\n"
        "for path in sys.argv[1:]:\n"
        "    fd = os.open(path, os.O_RDWR)\n"
        "    print(os.path.basename(path), fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE)\n"
    )
    env = {**os.environ, "LD_PRELOAD": str(shim), "MVM_PRIVATE_RAM": str(ram)}
    done = subprocess.run([sys.executable, "-c", probe, str(ram), str(other)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ram", str(os.O_RDONLY), "other", str(os.O_RDWR)]


def test_qemu_owns_only_what_it_opens(tmp_path: Path) -> None:
    spec = MachineSpec("m", tmp_path / "tpl" / "vmlinuz", tmp_path / "tpl" / "initrd.img", "", 256, 1,
                       Accelerator("tcg", "max", ()))  # fmt: skip
    names = _qemu_files(tmp_path, spec, RamBacking(tmp_path / "ram", share=True), None, console_socket=True)
    assert names == {"serial.log", "ram"}
    boot = MachineSpec("m", tmp_path / "vmlinuz", tmp_path / "initrd.img", "", 256, 1, Accelerator("tcg", "max", ()))
    names = _qemu_files(tmp_path, boot, RamBacking(tmp_path / "ram", share=True), None, console_socket=False)
    assert names == {"serial.log", "app.log", "ram", "vmlinuz", "initrd.img"}


@needs_root
def test_own_gives_the_directory_to_the_vm_uid_and_keeps_secrets_root_s(tmp_path: Path) -> None:
    vm = tmp_path / "vm"
    vm.mkdir(mode=0o755)
    for name in ("disk.qcow2", "agent.key", "state", "app.log"):
        (vm / name).write_text("x")
        os.chmod(vm / name, 0o644)
    _own(vm, 500_123, {"disk.qcow2", "serial.log"})
    st = vm.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (500_123, 500_123, 0o700)
    assert ((vm / "disk.qcow2").stat().st_uid, (vm / "disk.qcow2").stat().st_mode & 0o777) == (500_123, 0o600)
    for name in ("agent.key", "state", "app.log"):
        assert ((vm / name).stat().st_uid, (vm / name).stat().st_mode & 0o777) == (0, 0o600)


@needs_root
def test_start_refuses_a_uid_range_over_existing_users(tmp_path: Path) -> None:
    settings = VmmSettings(state_dir=tmp_path, jail=JailSettings(uid_start=65_000, uid_count=1000, limits=False))
    os.chmod(tmp_path, 0o700)
    with pytest.raises(VmmError, match=r"^jail\.uid_start=65000 / jail\.uid_count=1000: the range overlaps the "
                       r"existing (user|group) '\w+' \(\d+\); choose a range no user or group has$"):  # fmt: skip
        check_setup(settings)


@needs_root
def test_start_refuses_a_state_dir_others_can_read(tmp_path: Path) -> None:
    settings = VmmSettings(state_dir=tmp_path, jail=JailSettings(limits=False))
    os.chmod(tmp_path, 0o755)
    with pytest.raises(VmmError, match=r"^vmm\.state_dir .* is readable by others \(mode 0755\): chmod 700 it$"):
        check_setup(settings)
    os.chmod(tmp_path, 0o700)
    assert check_setup(settings) is None


def test_start_refuses_a_host_without_cgroup_controllers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jail.cgroups, "detect", lambda name: None)
    settings = VmmSettings(state_dir=tmp_path, jail=replace(JailSettings(), enabled=False))
    with pytest.raises(VmmError, match=r"^jail\.limits: no cgroup controllers: neither a cgroup v2 hierarchy"):
        check_setup(settings)


def test_the_helper_argv_carries_every_step_and_ends_in_qemu_s() -> None:
    jail_ = Jail(400_001, 400_001, "/run/j", (Bind("/usr", "/usr", 5), Bind("/dev/null", "/dev/null", 8, True)),
                 (("lib", "usr/lib"),), "/work", (108,))  # fmt: skip
    confinement = Confinement("/var/run/netns/mvm-v1", ("/cg/cpu/procs",), jail_, (20,), (("A", "b"),))
    assert confinement.argv(Path("/h"), ["qemu", "-S"]) == [
        "/h", "--netns", "/var/run/netns/mvm-v1", "--cgroup", "/cg/cpu/procs", "--keep-fd", "20", "--env", "A=b",
        "--jail", "400001", "400001", "/run/j", "/work", "--group", "108",
        "--bind", "/usr", "/usr", "5", "0", "--bind", "/dev/null", "/dev/null", "8", "1",
        "--symlink", "lib", "usr/lib", "--", "qemu", "-S",
    ]  # fmt: skip
    assert Confinement("/ns").argv(Path("/h"), ["qemu"]) == ["/h", "--netns", "/ns", "--", "qemu"]


def test_the_helper_builds_and_refuses_a_bad_argument(tmp_path: Path) -> None:
    helper = jail.build_native("jail_exec.c", tmp_path / "lib", shared=False)
    done = subprocess.run([str(helper), "--bogus", "--", "true"], capture_output=True, text=True)
    assert done.returncode == 127
    assert done.stderr.startswith("microvm-edge jail: bad argument --bogus")


@pytest.mark.parametrize("accel", ["kvm", "tcg"])
def test_dev_kvm_is_in_the_jail_only_under_kvm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accel: str) -> None:
    """The accelerator QEMU is given (vmm.accel.choose: kvm only with real VMX/SVM) decides: under KVM the
    jail binds /dev/kvm and gives QEMU the device's group; under TCG neither is there."""
    monkeypatch.setattr(jail, "kvm_groups", lambda: (108,))  # this host has no usable /dev/kvm
    spec = MachineSpec("mvm-v1", tmp_path / "vmlinuz", tmp_path / "initrd", "", 256, 1, choose(accel))
    settings = VmmSettings(state_dir=tmp_path, jail=JailSettings(root_dir=tmp_path / "jail"))
    confined = jail.Jailer(settings).jail_for(400_001, tmp_path / "vm", (), spec, shim=False)
    devices = {b.target for b in confined.binds if b.target.startswith("/dev/")}
    if accel == "kvm":
        assert devices == {"/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/dev/kvm"}
        assert confined.groups == (108,)
    else:
        assert devices == {"/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"}
        assert confined.groups == ()


@needs_root
def test_the_kvm_group_is_the_device_s_and_a_root_only_device_is_refused(tmp_path: Path) -> None:
    device = tmp_path / "kvm"
    device.touch()
    os.chown(device, 0, 108)
    os.chmod(device, 0o660)
    assert jail.kvm_groups(device) == (108,)  # Debian: root:kvm 0660
    os.chmod(device, 0o666)
    assert jail.kvm_groups(device) == ()  # everyone may open it: no group to add
    os.chmod(device, 0o600)
    with pytest.raises(VmmError, match=r"kvm is mode 0600, group 108: a jailed QEMU .* cannot open it"):
        jail.kvm_groups(device)
    os.chown(device, 0, 0)
    os.chmod(device, 0o660)
    with pytest.raises(VmmError, match=r"group 0"):  # root's group is never handed to a QEMU
        jail.kvm_groups(device)


def _runtime_on_a_v2_tree(tmp_path: Path) -> tuple[runtime.QemuRuntime, template.Template, Path]:
    """A QEMU runtime with the demo template whose cgroups go to a cgroup v2 tree made in `tmp_path`."""
    settings = VmmSettings(state_dir=tmp_path, jail=JailSettings(root_dir=tmp_path / "jail"))
    write_template(settings)
    qemus = runtime.QemuRuntime(settings, choose("tcg"), RecordStore(settings), None)
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("cpu memory pids\n")
    qemus.jail.cgroups = CgroupsV2("mvm", unified)
    return qemus, template.load(settings, "demo"), unified


async def test_a_vm_s_cgroup_is_made_beside_its_namespace_and_neither_stays_if_one_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runtime.provision: the group (with its limits) is ready for the spawn when the namespace is; a
    namespace that cannot be made takes the group with it, and a group that cannot be made the namespace."""
    qemus, tpl, unified = _runtime_on_a_v2_tree(tmp_path)
    (unified / "mvm" / "vms" / "v1").mkdir(parents=True)
    (unified / "mvm" / "vms" / "v1" / "memory.events").write_text("oom_kill 0\n")
    namespaces: list[str] = []

    async def create(vm_id: str) -> None:
        if "create" in failing:
            raise VmmError("ip netns add failed")
        namespaces.append(vm_id)

    async def delete(vm_id: str) -> None:  # as `ip netns delete` of one that is not there: nothing
        if vm_id in namespaces:
            namespaces.remove(vm_id)

    monkeypatch.setattr(runtime.netns, "create", create)
    monkeypatch.setattr(runtime.netns, "delete", delete)
    vm = LiveVm(VmRecord("v1", "demo", VmState.PENDING, Policy(), 8080, 0.0, 0.0))
    failing: set[str] = set()
    await qemus.provision(vm, tpl)
    assert namespaces == ["v1"]
    assert qemus.jail._ready["v1"] == [unified / "mvm" / "vms" / "v1" / "cgroup.procs"]
    assert (unified / "mvm" / "vms" / "v1" / "memory.max").read_text() == str((16 + 160) << 20)
    await delete("v1")

    failing.add("create")
    with pytest.raises(VmmError, match="ip netns add failed"):
        await qemus.provision(vm, tpl)
    assert "v1" not in qemus.jail._ready and namespaces == []

    failing.clear()
    qemus.jail.cgroups = CgroupsV2("mvm", tmp_path / "no-such-hierarchy")
    with pytest.raises(VmmError, match=r"^cgroup v2: cannot make group 'v1'"):
        await qemus.provision(vm, tpl)
    assert namespaces == [], "the namespace made beside it is deleted again"


async def test_a_cancelled_provision_leaves_neither_namespace_nor_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A launch or restore cancelled while its namespace is being made (a client gone, a shutdown)
    undoes both halves once they ended: no namespace and no cgroup outlive it."""
    qemus, tpl, unified = _runtime_on_a_v2_tree(tmp_path)
    namespaces: list[str] = []
    made = asyncio.Event()

    async def create(vm_id: str) -> None:  # made, then held: the cancel lands inside `ip netns add`'s step
        namespaces.append(vm_id)
        made.set()
        await asyncio.Event().wait()

    async def delete(vm_id: str) -> None:
        if vm_id in namespaces:
            namespaces.remove(vm_id)

    monkeypatch.setattr(runtime.netns, "create", create)
    monkeypatch.setattr(runtime.netns, "delete", delete)
    removed: list[tuple[str, bool]] = []  # a tmp dir with files is no cgroupfs: rmdir fails, so record it

    def remove(group: str) -> bool:
        removed.append((group, (unified / "mvm" / "vms" / group / "memory.max").exists()))
        return True

    monkeypatch.setattr(qemus.jail.cgroups, "remove", remove)
    vm = LiveVm(VmRecord("v1", "demo", VmState.PENDING, Policy(), 8080, 0.0, 0.0))
    provisioning = asyncio.create_task(qemus.provision(vm, tpl))
    await made.wait()
    provisioning.cancel()
    with pytest.raises(asyncio.CancelledError):
        await provisioning
    assert namespaces == []
    assert "v1" not in qemus.jail._ready
    assert removed == [("v1", True)], "the group is removed after it was made, not before"


async def test_a_cancelled_namespace_command_is_waited_for(tmp_path: Path) -> None:
    """netns' commands run to their end when the task running one is cancelled, so what the command
    made (a namespace) exists when the cancellation arrives and the undo that follows finds it."""
    started, done = tmp_path / "started", tmp_path / "done"
    command = asyncio.create_task(runtime.netns._run("sh", "-c", f"touch {started}; sleep 0.3; touch {done}"))
    while not started.exists():
        await asyncio.sleep(0.01)
    command.cancel()
    with pytest.raises(asyncio.CancelledError):
        await command
    assert done.exists()
