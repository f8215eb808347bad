"""Every QEMU jailed, every VM held to its share of the machine.

A guest that escapes QEMU's device emulation lands in a process that runs as a uid of its
own (leased per VM from [jail] uid_start..+uid_count), with no capabilities, no_new_privs and
QEMU's seccomp sandbox, in a mount namespace whose root holds only: /usr (read-only, for
QEMU and its libraries), a few device nodes, its own /proc, the VM's directory and the
read-only template files it maps. No other VM's files, no registry, config, TLS material or
keys. The tap is opened here and handed over as a descriptor; /dev/kvm is there only under KVM.

QEMU 7.2 opens a private (copy-on-write) RAM file read-write, which would let one clone write
into the template RAM every other clone maps. The template's files stay root's, read-only and
mounted read-only; a launched clone's QEMU gets vmm/native/private_ram.c preloaded, which opens
that one file read-only (what QEMU 8.1 does by itself). It and the spawn helper
(vmm/native/jail_exec.c) are built once per boot with the host's cc.

The uid a VM has is recorded as its directory's owner and in a host-wide lease file
(`lease_dir/<uid>`, naming the directory), so a restarted manager, or one of another state
directory, never hands it to another VM; a moved-in VM gets one of this host's uids.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from . import cgroups
from .cgroups import Cgroups, Limits
from .confine import MS_NODEV, MS_NOEXEC, MS_RDONLY, Bind, Confinement, Jail
from .errors import VmmError
from .jsonlog import log
from .model import Template, VmRecord
from .network import netns
from .qemu import APP_LOG, QEMU_LOG, SERIAL_LOG, DiskBacking, MachineSpec, QemuProcess, RamBacking, build_argv
from .settings import JailSettings, VmmSettings
from .tasks import to_its_end
from .vm_files import AGENT_KEY

DEVICES = ("null", "zero", "random", "urandom")
LEASE_GRACE = 60.0  # a lease younger than this is never taken for stale (its directory may not be chowned yet)
NATIVE = Path(__file__).parent / "native"
SHIM_IN_JAIL = "/mvm/private-ram.so"


class UidLeases:
    """Host-wide uid leases: `lease_dir/<uid>` holds the absolute path of the directory that has it."""

    def __init__(self, settings: JailSettings) -> None:
        self.start, self.count, self.dir = settings.uid_start, settings.uid_count, settings.lease_dir

    def in_range(self, uid: int) -> bool:
        return self.start <= uid < self.start + self.count

    def claim(self, owner: Path) -> int:
        """The uid `owner` has (its directory's owner, if leased to it or free), else the first free one."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            current = owner.stat().st_uid
            if self.in_range(current) and self._take(current, owner):
                return current
        for uid in range(self.start, self.start + self.count):
            if self._take(uid, owner):
                return uid
        raise VmmError(
            f"no free uid left in jail.uid_start={self.start} .. +jail.uid_count={self.count}: raise jail.uid_count"
        )

    def release(self, owner: Path, uid: int | None = None) -> None:
        """Give back the uid leased to `owner` (its directory's owner unless given; nothing if it holds none)."""
        with contextlib.suppress(FileNotFoundError):
            uid = owner.stat().st_uid if uid is None else uid
            if self.in_range(uid) and self.holder(uid) == str(owner):
                (self.dir / str(uid)).unlink(missing_ok=True)

    def holder(self, uid: int) -> str | None:
        try:
            return (self.dir / str(uid)).read_text()
        except FileNotFoundError:
            return None

    def _take(self, uid: int, owner: Path) -> bool:
        path = self.dir / str(uid)
        for _ in range(2):
            tmp = self.dir / f".{uid}.{os.getpid()}.tmp"
            tmp.write_text(str(owner))
            try:
                os.link(tmp, path)  # atomic, with its content: nobody reads a half-written lease
                return True
            except FileExistsError:
                held = self.holder(uid)
                if held == str(owner):
                    return True
                if held is None or not self._stale(uid, Path(held), path):
                    return False
                path.unlink(missing_ok=True)
            finally:
                tmp.unlink(missing_ok=True)
        return False

    @staticmethod
    def _stale(uid: int, held_by: Path, lease: Path) -> bool:
        """A lease whose directory is gone, or no longer owned by its uid (deleted without release)."""
        try:
            if time.time() - lease.stat().st_mtime < LEASE_GRACE:
                return False
            return held_by.stat().st_uid != uid
        except FileNotFoundError:
            return True


def build_native(source: str, directory: Path, shared: bool) -> Path:
    """vmm/native/`source` built with the host's cc into `directory` (once per source version)."""
    text = (NATIVE / source).read_bytes()
    suffix = ".so" if shared else ""
    target = directory / f"{Path(source).stem}-{hashlib.sha256(text).hexdigest()[:16]}{suffix}"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    tmp = directory / f".{target.name}.{os.getpid()}.tmp"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise VmmError("jail.enabled needs a C compiler (cc) to build its helpers: apt-get install gcc libc6-dev")
    flags = ["-shared", "-fPIC"] if shared else []
    done = subprocess.run(
        [cc, *flags, "-O2", "-Wall", "-o", str(tmp), str(NATIVE / source), "-ldl"], capture_output=True, text=True
    )
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise VmmError(f"building vmm/native/{source} failed: {' '.join(done.stderr.split())[-300:]}")
    os.chmod(tmp, 0o755)
    tmp.rename(target)
    return target


def check_setup(settings: VmmSettings, state_dir_check: bool = True) -> Cgroups | None:
    """Refuse a host set up so that the jail or the limits would not hold; one line names what is wrong."""
    jail = settings.jail
    if jail.enabled:
        if os.geteuid() != 0:
            raise VmmError("jail.enabled needs the host process to start as root (it drops to a uid per QEMU)")
        end = jail.uid_start + jail.uid_count
        taken = [(p.pw_name, p.pw_uid, "user") for p in pwd.getpwall() if jail.uid_start <= p.pw_uid < end]
        taken += [(g.gr_name, g.gr_gid, "group") for g in grp.getgrall() if jail.uid_start <= g.gr_gid < end]
        if taken:
            name, uid, kind = taken[0]
            raise VmmError(
                f"jail.uid_start={jail.uid_start} / jail.uid_count={jail.uid_count}: the range overlaps the existing "
                f"{kind} {name!r} ({uid}); choose a range no user or group has"
            )
        qemu = shutil.which(settings.qemu_binary)
        if qemu is None or not os.path.realpath(qemu).startswith("/usr/"):
            raise VmmError(f"vmm.qemu_binary {settings.qemu_binary!r} must be a program under /usr (the jail's /usr)")
    if state_dir_check and jail.enabled:
        mode = settings.state_dir.stat().st_mode & 0o777
        if mode & 0o007:
            raise VmmError(
                f"vmm.state_dir {settings.state_dir} is readable by others (mode {mode:04o}): chmod 700 it"
            )
    if not jail.limits:
        return None
    found = cgroups.detect(jail.cgroup_name)
    if found is None:
        raise VmmError(f"jail.limits: no cgroup controllers: {cgroups.missing_controllers_text()}")
    return found


def join_host_group(settings: JailSettings) -> None:
    """This process (and the children it starts from now on) into the host's CPU group, if limits are on.

    A host that cannot is refused by its own manager's start with the reason; nothing to say twice here.
    """
    found = cgroups.detect(settings.cgroup_name) if settings.limits else None
    if found is not None:
        with contextlib.suppress(VmmError):
            found.setup(settings.host_cpu_weight, os.getpid())


class Jailer:
    """Spawns every QEMU of a manager (or a template boot) confined and limited, and frees what it leased."""

    def __init__(self, settings: VmmSettings) -> None:
        self.settings = settings
        self.jail = settings.jail
        self.leases = UidLeases(settings.jail)
        self.shim: Path | None = None
        self.helper: Path | None = None
        self.cgroups: Cgroups | None = None
        self.owner = str(settings.state_dir.resolve())  # marks the cgroups this state directory's manager makes
        self._uids: dict[str, int] = {}  # group -> the uid its last QEMU got here
        self._ready: dict[str, list[Path]] = {}  # group -> its join files, made ahead of its QEMU (prepare_group)

    def start(self, state_dir_check: bool = True, join_host: bool = True) -> None:
        """Check the host, make the cgroup tree and (for a host process) join the host's group."""
        self.cgroups = check_setup(self.settings, state_dir_check)
        if self.jail.enabled:
            self.jail.root_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
            self.jail.lease_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.jail.enabled or self.jail.limits:
            self.helper = build_native("jail_exec.c", self.jail.root_dir.parent, shared=False)
        if self.jail.enabled:
            self.shim = build_native("private_ram.c", self.jail.root_dir.parent, shared=True)
        if self.cgroups is not None:
            self.cgroups.setup(self.jail.host_cpu_weight, os.getpid() if join_host else None)
        log.event("jail.ready", jailed=self.jail.enabled, cgroups=self.cgroups.version if self.cgroups else None,
                  uids=f"{self.jail.uid_start}+{self.jail.uid_count}")  # fmt: skip

    def limits(self, vcpus: int, memory_mb: int, cpu_share: float = 1.0) -> Limits:
        j = self.jail
        return cgroups.limits_for(vcpus, memory_mb, cpu_share, j.memory_overhead_mb, j.pids_max, j.io_weight)

    async def prepare_group(self, rec: VmRecord, tpl: Template) -> None:
        """The VM's cgroup with its limits, made in a thread ahead of its QEMU (beside its namespace), so
        a restore does not wait for it; the next spawn of the VM joins it."""
        if self.cgroups is not None:
            limits = self.limits(tpl.vcpus, tpl.memory_mb, rec.policy.cpu_share)
            # Cancelled, the thread runs on anyway: the group exists once it ends, for the undo.
            self._ready[rec.id] = await to_its_end(asyncio.to_thread(self.cgroups.prepare, rec.id, limits, self.owner))

    def remove_group(self, group: str) -> None:
        """The group goes (a suspended VM keeps none); one its QEMU still holds is left to a sweep."""
        self._ready.pop(group, None)
        if self.cgroups is not None:
            self.cgroups.remove(group)

    async def sweep(self, gone: Iterable[str] = ()) -> None:
        """Groups no QEMU will join again: `gone`'s (VMs deleted or failed) and every empty one of this
        state directory's (or of one that no longer exists) past the grace (vmm.cgroups.Cgroups.sweep)."""
        if self.cgroups is None:
            return
        removed = await asyncio.to_thread(self.cgroups.sweep, self.owner, gone)
        if removed:
            log.event("cgroup.swept", groups=removed)

    async def spawn_vm(
        self, rec: VmRecord, tpl: Template, spec: MachineSpec, ram: RamBacking, disk: DiskBacking | None,
        run_dir: Path, on_exit: Callable[[QemuProcess, int | None], None], read_only: tuple[Path, ...] = (),
    ) -> QemuProcess:  # fmt: skip
        """A VM's QEMU (launch, restore, RAM move, fork), waiting for its snapshot (`-incoming defer`);
        `read_only`: directories of checkpoints it maps or reads its disk through, besides its template's."""
        limits = self.limits(tpl.vcpus, tpl.memory_mb, rec.policy.cpu_share)
        return await self.spawn(
            rec.id, rec.id, spec, ram, disk, run_dir, (Path(tpl.path), *read_only), limits, True, True, on_exit
        )

    async def spawn(
        self, ns_id: str, group: str, spec: MachineSpec, ram: RamBacking, disk: DiskBacking | None, run_dir: Path,
        read_only: Iterable[Path], limits: Limits, incoming: bool, console_socket: bool,
        on_exit: Callable[[QemuProcess, int | None], None] | None = None,
    ) -> QemuProcess:  # fmt: skip
        """QEMU in namespace `ns_id` and cgroup `group`, jailed with `run_dir` writable and `read_only` not."""
        binary = self.settings.qemu_binary
        if not self.jail.enabled and self.cgroups is None:
            argv = build_argv(binary, spec, ram, disk, run_dir, incoming, console_socket)
            return QemuProcess.spawn(argv, ns_id, run_dir / QEMU_LOG, on_exit)
        keep_fds: list[int] = []
        tap_fd = await netns.open_tap(ns_id) if self.jail.enabled else None
        try:
            qemu_files = _qemu_files(run_dir, spec, ram, disk, console_socket)
            jail: Jail | None = None
            env: dict[str, str] = {}
            if self.jail.enabled:
                assert tap_fd is not None
                keep_fds.append(tap_fd)
                if not ram.share:  # the template's RAM, mapped copy-on-write: opened read-only
                    env = {"LD_PRELOAD": SHIM_IN_JAIL, "MVM_PRIVATE_RAM": str(ram.path)}
                uid = self._uids[group] = self.leases.claim(run_dir.absolute())
                _own(run_dir, uid, qemu_files)
                jail = self.jail_for(uid, run_dir, read_only, spec, bool(env))
            argv = build_argv(binary, spec, ram, disk, run_dir, incoming, console_socket, tap_fd, self.jail.enabled)
            joins = self._ready.pop(group, None)  # made beside the namespace (provision), or now
            if joins is None and self.cgroups is not None:
                joins = await asyncio.to_thread(self.cgroups.prepare, group, limits, self.owner)
            confinement = Confinement(
                str(netns.NETNS_DIR / netns.ns_name(ns_id)), tuple(map(str, joins or ())), jail, tuple(keep_fds),
                tuple(env.items()),
            )  # fmt: skip
            assert self.helper is not None
            proc = QemuProcess.spawn(argv, ns_id, run_dir / QEMU_LOG, on_exit, (confinement, self.helper))
        finally:
            if tap_fd is not None:
                os.close(tap_fd)
        log.event("jail.spawned", level="debug", vm=group, pid=proc.pid, uid=jail.uid if jail else 0,
                  memory_mb=limits.memory_mb, cpu_quota_us=limits.cpu_quota_us)  # fmt: skip
        return proc

    def jail_for(self, uid: int, run_dir: Path, read_only: Iterable[Path], spec: MachineSpec, shim: bool) -> Jail:
        """What QEMU's root holds and who it becomes; /dev/kvm (and the group that may open it) only under KVM."""
        kvm = spec.accel.name == "kvm"
        binds = [Bind("/usr", "/usr", MS_RDONLY | MS_NODEV)]
        if shim:
            assert self.shim is not None
            binds.append(Bind(str(self.shim), SHIM_IN_JAIL, MS_RDONLY | MS_NODEV, is_file=True))
        symlinks = []
        for top in ("bin", "lib", "lib64", "sbin"):
            if os.path.islink(f"/{top}"):
                symlinks.append((top, os.readlink(f"/{top}")))
            elif os.path.isdir(f"/{top}"):
                binds.append(Bind(f"/{top}", f"/{top}", MS_RDONLY | MS_NODEV))
        for device in (*DEVICES, *(("kvm",) if kvm else ())):
            binds.append(Bind(f"/dev/{device}", f"/dev/{device}", MS_NOEXEC, is_file=True))
        binds.append(Bind(_real(run_dir), _abs(run_dir), MS_NODEV | MS_NOEXEC))
        for path in read_only:  # at the path QEMU is given and at the real one (a qcow2 names its backing file so)
            for target in dict.fromkeys((_abs(path), _real(path))):
                binds.append(Bind(_real(path), target, MS_RDONLY | MS_NODEV | MS_NOEXEC))
        binds.sort(key=lambda b: b.target.count("/"))
        groups = kvm_groups() if kvm else ()
        return Jail(uid, uid, str(self.jail.root_dir.absolute()), tuple(binds), tuple(symlinks), os.getcwd(), groups)

    def oom_reason(self, group: str) -> str | None:
        """"out of memory: cgroup limit N MiB" if the kernel ended the group's QEMU for its memory limit."""
        if self.cgroups is None or not self.cgroups.oom_killed(group):
            return None
        limit = self.cgroups.memory_limit_mb(group)
        log.event("vm.oom_killed", level="error", vm=group, limit_mb=limit)
        return f"out of memory: cgroup limit {limit} MiB"

    async def release(self, group: str, run_dir: Path) -> None:
        """The VM is gone: its uid goes back to the pool, its cgroup away (with any other left behind)."""
        if self.jail.enabled:
            self.leases.release(run_dir.absolute(), self._uids.pop(group, None))
        self._ready.pop(group, None)
        await self.sweep({group})


def kvm_groups(device: Path = Path("/dev/kvm")) -> tuple[int, ...]:
    """The supplementary group a jailed QEMU needs to open /dev/kvm: the device's group (kvm on Debian),
    none if everyone may open it; a device only root may open cannot be used from the jail."""
    st = device.stat()
    if st.st_mode & 0o006 == 0o006:
        return ()
    if st.st_gid != 0 and st.st_mode & 0o060 == 0o060:
        return (st.st_gid,)
    raise VmmError(
        f"{device} is mode {st.st_mode & 0o777:04o}, group {st.st_gid}: a jailed QEMU (its own uid) cannot open it; "
        "give it a group of its own with read and write (Debian's udev rule: root:kvm 0660)"
    )


def seal_template(work: Path) -> None:
    """A template's files, written by its boot's jailed QEMU, become root's and read-only for every clone;
    a session template's agent key stays root's alone (no QEMU reads it)."""
    for path in (work, *work.rglob("*")):
        if path.is_symlink():
            continue
        os.chown(path, 0, 0)
        os.chmod(path, 0o755 if path.is_dir() else 0o400 if path.name == AGENT_KEY else 0o444)


def _qemu_files(
    run_dir: Path, spec: MachineSpec, ram: RamBacking, disk: DiskBacking | None, console_socket: bool
) -> set[str]:
    """Files of `run_dir` QEMU itself opens; every other one stays root's."""
    names = {SERIAL_LOG} | (set() if console_socket else {APP_LOG})
    for path in (spec.kernel, spec.initrd, ram.path if ram.share else None, disk.path if disk is not None else None):
        if path is not None and path.parent == run_dir:
            names.add(path.name)
    return names


def _own(run_dir: Path, uid: int, qemu_files: set[str]) -> None:
    """The directory and what QEMU opens in it become the VM uid's (0700/0600); the rest root's, 0600."""
    os.chown(run_dir, uid, uid)
    os.chmod(run_dir, 0o700)
    for entry in run_dir.iterdir():
        if entry.is_symlink() or not entry.is_file():
            continue
        owner = uid if entry.name in qemu_files else 0
        st = entry.stat()
        if st.st_uid != owner or st.st_mode & 0o077:
            os.chown(entry, owner, owner)
            os.chmod(entry, 0o600)


def _abs(path: Path) -> str:
    return os.path.abspath(path)


def _real(path: Path) -> str:
    return os.path.realpath(path)
