"""The steps a QEMU's process takes between fork and exec: into its VM's network namespace and
cgroups, into a mount namespace whose root holds only its jail, then down to its own uid with no
capabilities and no_new_privs.

QEMU 7.2's own `-runas` cannot be used: with `-sandbox elevateprivileges=deny` its filter is in
place before `-runas` drops privileges, and the setuid kills it. So the privileges are gone
before QEMU starts, and QEMU's sandbox is installed on a process that has none left.

Everything here runs in the forked child (subprocess's preexec_fn): only system calls on values
prepared in the parent, no locks, no event loop.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
SYS_PIVOT_ROOT = 155  # x86_64
CAP_LAST = 63  # dropping past the kernel's last capability fails harmlessly (EINVAL)
PROC_OPTIONS = b"hidepid=invisible,subset=pid"  # its own processes only (QEMU reads /proc/self/exe, maps)

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Bind:
    """`source` (a host path) appears at `target` in the jail; `flags` add to MS_NOSUID (e.g. MS_RDONLY)."""

    source: bytes
    target: bytes
    flags: int
    is_file: bool = False  # a device node or a single file: the mount point is a file


@dataclass(frozen=True)
class Jail:
    """Who the QEMU becomes and what its root holds."""

    uid: int
    gid: int
    root: bytes  # an empty directory of the host: the jail's tmpfs root is mounted over it in the new namespace
    binds: tuple[Bind, ...]
    symlinks: tuple[tuple[bytes, bytes], ...]  # (name in the jail's root, target)
    cwd: bytes  # QEMU's argv uses paths relative to the manager's working directory: it exists in the jail too
    groups: tuple[int, ...] = ()  # supplementary groups: only the kvm group, under KVM (/dev/kvm is root:kvm 0660)


@dataclass(frozen=True)
class Confinement:
    """What the child does before it execs QEMU; `jail` None: namespace and cgroups only (vmm.jail off)."""

    netns_path: bytes
    cgroup_procs: tuple[bytes, ...] = ()
    jail: Jail | None = None
    pass_fds: tuple[int, ...] = field(default_factory=tuple)
    env: tuple[tuple[str, str], ...] = ()  # added to QEMU's environment

    def preexec(self) -> None:
        """In the child; a failure is written to its stderr (the VM's qemu.log) and ends it."""
        try:
            _enter_netns(self.netns_path)
            pid = str(os.getpid()).encode()
            for procs in self.cgroup_procs:
                _write(procs, pid)
            if self.jail is not None:
                _build_root(self.jail)
                _drop_privileges(self.jail)
        except OSError as exc:
            os.write(2, f"microvm-edge jail: {exc}\n".encode())
            raise


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _enter_netns(path: bytes) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns {path.decode()}")
    finally:
        os.close(fd)


def _mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int, data: bytes | None) -> None:
    _check(_libc.mount(source, target, fstype, ctypes.c_ulong(flags), data), f"mount {target.decode()}")


def _build_root(jail: Jail) -> None:
    """A new mount namespace whose root is a small tmpfs holding only the jail's binds, pivoted into."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, b"/", None, MS_REC | MS_PRIVATE, None)  # nothing done here reaches the host's mounts
    root = jail.root
    _mount(b"tmpfs", root, b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=64k,nr_inodes=256")
    for name, target in jail.symlinks:
        os.symlink(target, root + b"/" + name)
    for bind in jail.binds:
        where = root + bind.target
        if bind.is_file:
            os.makedirs(os.path.dirname(where), 0o755, exist_ok=True)
            os.close(os.open(where, os.O_WRONLY | os.O_CREAT, 0o600))
        else:
            os.makedirs(where, 0o755, exist_ok=True)
        _mount(bind.source, where, None, MS_BIND | MS_REC, None)
        _mount(None, where, None, MS_REMOUNT | MS_BIND | MS_NOSUID | bind.flags, None)
    os.makedirs(root + b"/proc", 0o555, exist_ok=True)
    _mount(b"proc", root + b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, PROC_OPTIONS)
    os.makedirs(root + jail.cwd, 0o755, exist_ok=True)
    old = root + b"/.old"
    os.mkdir(old, 0o700)
    _check(_libc.syscall(SYS_PIVOT_ROOT, root, old), "pivot_root")
    os.chdir(b"/")
    _check(_libc.umount2(b"/.old", MNT_DETACH), "umount the host's root")
    os.rmdir(b"/.old")
    _mount(None, b"/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
    os.chdir(jail.cwd)


def _drop_privileges(jail: Jail) -> None:
    """No supplementary groups (but kvm's under KVM), its own gid and uid (which clears every capability),
    no way back."""
    os.setgroups(list(jail.groups))
    os.setresgid(jail.gid, jail.gid, jail.gid)
    for cap in range(CAP_LAST + 1):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    os.setresuid(jail.uid, jail.uid, jail.uid)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    os.umask(0o077)


def _write(path: bytes, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
