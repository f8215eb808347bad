"""What a QEMU's process does between spawn and exec, as the argv of vmm/native/jail_exec.c.

It enters the VM's network namespace and cgroups (writing "0", itself, to each group's join
file), a mount namespace whose root holds only its jail, then drops to its own uid with no
capabilities and no_new_privs, closes every descriptor but the kept ones, and execs QEMU.
QEMU 7.2's own `-runas` cannot be used: with `-sandbox elevateprivileges=deny` its filter is in
place before `-runas` drops privileges, and the setuid kills it. So the privileges are gone
before QEMU starts.

The steps run in a small C program started with posix_spawn: a fork of the manager (a large
Python process) costs tens of milliseconds in page-table copies, on every launch and restore.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8


@dataclass(frozen=True)
class Bind:
    """`source` (a host path) appears at `target` in the jail; `flags` add to MS_NOSUID (e.g. MS_RDONLY)."""

    source: str
    target: str
    flags: int
    is_file: bool = False  # a device node or a single file: the mount point is a file


@dataclass(frozen=True)
class Jail:
    """Who the QEMU becomes and what its root holds."""

    uid: int
    gid: int
    root: str  # an empty directory of the host: the jail's tmpfs root is mounted over it in the new namespace
    binds: tuple[Bind, ...]
    symlinks: tuple[tuple[str, str], ...]  # (name in the jail's root, target)
    cwd: str  # QEMU's argv uses paths relative to the manager's working directory: it exists in the jail too
    groups: tuple[int, ...] = ()  # supplementary groups: only the kvm group, under KVM (/dev/kvm is root:kvm 0660)


@dataclass(frozen=True)
class Confinement:
    """Where the child goes before it execs QEMU; `jail` None: namespace and cgroups only (jail.enabled off)."""

    netns_path: str
    cgroup_joins: tuple[str, ...] = ()  # each group's join file (vmm.cgroups: v1 tasks, v2 cgroup.procs)
    jail: Jail | None = None
    keep_fds: tuple[int, ...] = ()  # descriptors QEMU gets (the tap); every other one is closed
    env: tuple[tuple[str, str], ...] = ()  # set for QEMU only (not for the helper: LD_PRELOAD names a jail path)

    def argv(self, helper: Path, qemu_argv: list[str]) -> list[str]:
        """The helper's command line, ending in `-- <qemu argv>`."""
        args = [str(helper), "--netns", self.netns_path]
        for join in self.cgroup_joins:
            args += ["--cgroup", join]
        for fd in self.keep_fds:
            args += ["--keep-fd", str(fd)]
        for name, value in self.env:
            args += ["--env", f"{name}={value}"]
        jail = self.jail
        if jail is not None:
            args += ["--jail", str(jail.uid), str(jail.gid), jail.root, jail.cwd]
            for gid in jail.groups:
                args += ["--group", str(gid)]
            for bind in jail.binds:
                args += ["--bind", bind.source, bind.target, str(bind.flags), "1" if bind.is_file else "0"]
            for name, target in jail.symlinks:
                args += ["--symlink", name, target]
        return [*args, "--", *qemu_argv]
