"""Per-VM resource limits: each QEMU in a cgroup of its own, on cgroup v2 or the v1 controllers.

A VM's group caps its CPU at its vCPUs (times the policy's `cpu_share`), its memory at guest
RAM plus QEMU's own overhead with no swap, its tasks, and weighs its I/O. The host and edge
processes sit in a group of their own with a larger CPU weight, so guests spinning every vCPU
cannot starve the proxy. A QEMU ended by its memory limit is told apart from any other death
by the group's OOM-kill counter.

Each group carries its maker's state directory in an extended attribute (OWNER_XATTR, root's
alone), so a sweep removes only empty groups of its own manager, or of a state directory that
no longer exists, never those of another manager sharing the tree (a fleet host on the same
machine). A group younger than GROUP_GRACE is never swept: its QEMU may be joining it now.

Both layouts are supported: v2 (one hierarchy, /sys/fs/cgroup on Debian 12) and v1 (one
hierarchy per controller, /sys/fs/cgroup/<controller>). The trees live at fixed places under
each hierarchy's root, so a restarted manager finds the groups of the QEMUs it re-adopts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import VmmError
from .jsonlog import log

CPU_PERIOD_US = 100_000
VM_CPU_WEIGHT = 100  # v2 cpu.weight of a VM (the kernel's default); the host group's is configured
V1_SHARES_PER_WEIGHT = 1024 / 100  # v1 cpu.shares 1024 is v2 cpu.weight 100
_V1_NEEDED = ("cpu", "memory", "pids")  # blkio is used where the host has it
_V2_NEEDED = ("cpu", "memory", "pids")
_V1_OPTIONAL = ("blkio", "cpuacct")  # I/O weight, and the group's CPU time (often mounted with cpu)
OWNER_XATTR = "trusted.microvm-edge.owner"  # the state directory of the manager that made the group
GROUP_GRACE = 60.0  # seconds a group is left alone by sweeps after it was made (its QEMU may be joining)


@dataclass(frozen=True)
class Limits:
    """What one QEMU may use of the host."""

    cpu_quota_us: int  # per CPU_PERIOD_US: 100_000 is one whole CPU
    memory_bytes: int
    pids_max: int
    io_weight: int  # 1-10000 (v2); v1's blkio.weight is 10-1000

    @property
    def memory_mb(self) -> int:
        return self.memory_bytes >> 20


@dataclass(frozen=True)
class GroupUsage:
    """What a group's tasks used, as the kernel counts it: CPU time so far, memory now and at most."""

    cpu_ns: int
    memory_bytes: int
    memory_peak_bytes: int
    memory_limit_bytes: int  # -1: none


def limits_for(vcpus: int, memory_mb: int, cpu_share: float, overhead_mb: int, pids_max: int, io_weight: int) -> Limits:
    """A VM's limits: its vCPUs (lowered by `cpu_share`), guest RAM + QEMU's overhead, tasks, I/O weight."""
    quota = max(1000, round(vcpus * cpu_share * CPU_PERIOD_US))
    return Limits(quota, (memory_mb + overhead_mb) << 20, pids_max, io_weight)


class Cgroups:
    """The groups of one cgroup layout; subclasses know where files are and what they are called."""

    version = 0

    def __init__(self, name: str) -> None:
        self.name = name
        self._oom_baseline: dict[str, int] = {}

    # ---- what a layout provides ---------------------------------------------------------

    def vm_dirs(self, group: str) -> list[Path]:
        """Every directory of `group` (one per hierarchy)."""
        raise NotImplementedError

    def _vms_parents(self) -> list[Path]:
        """The directories holding the VM groups (one per hierarchy)."""
        raise NotImplementedError

    def _join_file(self, directory: Path) -> Path:
        """The file of a group's directory a process writes "0" into to join it."""
        raise NotImplementedError

    def host_dirs(self) -> list[Path]:
        raise NotImplementedError

    def _cpu_vms_dir(self) -> Path:
        """The directory holding a group per VM in the hierarchy that has the cpu controller."""
        raise NotImplementedError

    def _prepare_tree(self, host_cpu_weight: int) -> None:
        raise NotImplementedError

    def _write_limits(self, group: str, limits: Limits) -> None:
        raise NotImplementedError

    def oom_kills(self, group: str) -> int:
        raise NotImplementedError

    def read_limits(self, group: str) -> Limits:
        """The limits as the kernel holds them (tests and `mvm` diagnostics)."""
        raise NotImplementedError

    def usage(self, group: str) -> GroupUsage:
        """The group's usage counters; OSError when the group is not there."""
        raise NotImplementedError

    def set_cpu_weight(self, group: str, weight: int) -> None:
        """The group's CPU weight (v2 cpu.weight, 1-10000; a VM starts at VM_CPU_WEIGHT)."""
        raise NotImplementedError

    def cpu_weight(self, group: str) -> int:
        """The group's CPU weight as set (v1 cpu.shares read back as a v2 weight, rounded)."""
        raise NotImplementedError

    def threads(self, group: str) -> list[int]:
        """The thread ids in the group's CPU hierarchy; OSError when the group is not there."""
        raise NotImplementedError

    def groups(self) -> list[str]:
        """Every VM group on the host (those of other managers of the same tree too: they share its cores)."""
        try:
            return sorted(p.name for p in self._cpu_vms_dir().iterdir() if p.is_dir())
        except OSError:
            return []

    # ---- shared behaviour ---------------------------------------------------------------

    def setup(self, host_cpu_weight: int, host_pid: int | None) -> None:
        """Make the tree (and the host group with its CPU weight); move `host_pid` into the host group."""
        try:
            self._prepare_tree(host_cpu_weight)
            if host_pid is not None:
                for directory in self.host_dirs():
                    _write(directory / "cgroup.procs", str(host_pid))
        except OSError as exc:
            raise VmmError(f"cgroup v{self.version}: cannot set up {self.name!r}: {exc}") from exc

    def prepare(self, group: str, limits: Limits, owner: str) -> list[Path]:
        """A fresh group with `limits`, marked as `owner`'s (a state directory); returns the files the
        QEMU's spawn helper writes "0" into to join it before exec (vmm/native/jail_exec.c)."""
        try:
            for directory in self.vm_dirs(group):
                with contextlib.suppress(FileNotFoundError, OSError):
                    directory.rmdir()  # a group left by an earlier QEMU of the VM: its counters start again
                directory.mkdir(parents=True, exist_ok=True)
                _mark(directory, owner)
            self._write_limits(group, limits)
            self._oom_baseline[group] = self.oom_kills(group)
        except OSError as exc:
            raise VmmError(f"cgroup v{self.version}: cannot make group {group!r}: {exc}") from exc
        return [self._join_file(d) for d in self.vm_dirs(group)]

    def oom_killed(self, group: str) -> bool:
        """Whether the kernel ended a task of `group` for its memory limit since the group was prepared."""
        try:
            return self.oom_kills(group) > self._oom_baseline.get(group, 0)
        except OSError:
            return False

    def memory_limit_mb(self, group: str) -> int | None:
        try:
            return self.read_limits(group).memory_mb
        except (OSError, ValueError):
            return None

    def remove(self, group: str) -> bool:
        """The group goes with its VM; False if it stays (a live task holds it: a later sweep removes it)."""
        removed = True
        for directory in self.vm_dirs(group):
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                removed = False
                if exc.errno != errno.EBUSY:
                    log.event("cgroup.remove_failed", level="warning", group=group, error=str(exc))
        if removed:
            self._oom_baseline.pop(group, None)
        return removed

    def sweep(self, owner: str, gone: Iterable[str] = (), now: float | None = None) -> list[str]:
        """Remove groups no QEMU will join again; returns their names.

        Those named in `gone` (VMs of `owner` deleted or failed), and every group marked as
        `owner`'s, or as a state directory's that no longer exists, made GROUP_GRACE ago or more.
        A group with a task stays (rmdir says EBUSY), and so does one another manager marked.
        """
        now = time.time() if now is None else now
        gone = set(gone)
        names = {p.name for parent in self._vms_parents() if parent.is_dir() for p in parent.iterdir() if p.is_dir()}
        return [g for g in sorted(names) if self._sweepable(g, owner, g in gone, now) and self.remove(g)]

    def _sweepable(self, group: str, owner: str, gone: bool, now: float) -> bool:
        for directory in self.vm_dirs(group):
            try:
                made = directory.stat().st_mtime
            except OSError:
                continue  # not in this hierarchy (a group half removed): another one says
            try:
                marked: str | None = os.getxattr(directory, OWNER_XATTR).decode()
            except OSError:
                marked = None  # made before groups were marked, or where the mark failed
            if marked is not None and marked != owner and os.path.isdir(marked):
                return False  # another manager's, alive or not: it sweeps its own
            return gone or (marked is not None and now - made >= GROUP_GRACE)
        return False


class CgroupsV1(Cgroups):
    """One hierarchy per controller: cpu, memory, pids (and blkio, cpuacct where mounted)."""

    version = 1

    def __init__(self, name: str, mounts: dict[str, Path]) -> None:
        super().__init__(name)
        self.mounts = mounts  # controller -> its hierarchy's mount point

    def _dir(self, controller: str, *parts: str) -> Path:
        return self.mounts[controller].joinpath(self.name, *parts)

    def vm_dirs(self, group: str) -> list[Path]:
        return list(dict.fromkeys(self._dir(c, "vms", group) for c in self._controllers()))  # co-mounted: once

    def _vms_parents(self) -> list[Path]:
        return list(dict.fromkeys(self._dir(c, "vms") for c in self._controllers()))

    def _join_file(self, directory: Path) -> Path:
        # v1's per-thread file: the helper moving its only thread itself skips the kernel's global
        # threadgroup lock (and the RCU grace period that lock waits for) that cgroup.procs takes.
        return directory / "tasks"

    def _cpu_vms_dir(self) -> Path:
        return self._dir("cpu", "vms")

    def host_dirs(self) -> list[Path]:
        # Only the CPU hierarchy: the host's memory and tasks stay where its service manager put them.
        return [self._dir("cpu", "host")]

    def _controllers(self) -> list[str]:
        return [c for c in ("cpu", "memory", "pids", *_V1_OPTIONAL) if c in self.mounts]

    def _prepare_tree(self, host_cpu_weight: int) -> None:
        for controller in self._controllers():
            self._dir(controller, "vms").mkdir(parents=True, exist_ok=True)  # co-mounted: exists already
        self._dir("cpu", "host").mkdir(parents=True, exist_ok=True)
        _write(self._dir("cpu", "host", "cpu.shares"), str(round(host_cpu_weight * V1_SHARES_PER_WEIGHT)))

    def _write_limits(self, group: str, limits: Limits) -> None:
        cpu, memory, pids = (self._dir(c, "vms", group) for c in ("cpu", "memory", "pids"))
        _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", str(limits.cpu_quota_us))
        _write(cpu / "cpu.shares", str(round(VM_CPU_WEIGHT * V1_SHARES_PER_WEIGHT)))
        _write(memory / "memory.limit_in_bytes", str(limits.memory_bytes))
        if (memory / "memory.memsw.limit_in_bytes").exists():  # memory + swap: the same, so no swap
            _write(memory / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        _write(memory / "memory.swappiness", "0")
        _write(pids / "pids.max", str(limits.pids_max))
        if "blkio" in self.mounts:
            for name in ("blkio.weight", "blkio.bfq.weight"):  # only with the CFQ or BFQ scheduler
                if (self._dir("blkio", "vms", group) / name).exists():
                    _write(self._dir("blkio", "vms", group) / name, str(min(1000, max(10, limits.io_weight))))
                    break

    def oom_kills(self, group: str) -> int:
        return _field(self._dir("memory", "vms", group) / "memory.oom_control", "oom_kill")

    def read_limits(self, group: str) -> Limits:
        cpu, memory, pids = (self._dir(c, "vms", group) for c in ("cpu", "memory", "pids"))
        quota = int(_read(cpu / "cpu.cfs_quota_us"))
        period = int(_read(cpu / "cpu.cfs_period_us"))
        weight = 0
        for name in ("blkio.weight", "blkio.bfq.weight"):
            path = self._dir("blkio", "vms", group) / name if "blkio" in self.mounts else None
            if path is not None and path.exists():
                weight = int(_read(path).split()[-1])
                break
        return Limits(
            quota * CPU_PERIOD_US // period, int(_read(memory / "memory.limit_in_bytes")),
            _max(_read(pids / "pids.max")), weight,
        )  # fmt: skip

    def usage(self, group: str) -> GroupUsage:
        memory = self._dir("memory", "vms", group)
        current = int(_read(memory / "memory.usage_in_bytes"))
        cpu_ns = int(_read(self._dir("cpuacct", "vms", group) / "cpuacct.usage")) if "cpuacct" in self.mounts else 0
        peak = max(current, int(_read(memory / "memory.max_usage_in_bytes")))
        return GroupUsage(cpu_ns, current, peak, int(_read(memory / "memory.limit_in_bytes")))

    def set_cpu_weight(self, group: str, weight: int) -> None:
        _write(self._dir("cpu", "vms", group) / "cpu.shares", str(max(2, round(weight * V1_SHARES_PER_WEIGHT))))

    def cpu_weight(self, group: str) -> int:
        return round(int(_read(self._dir("cpu", "vms", group) / "cpu.shares")) / V1_SHARES_PER_WEIGHT)

    def threads(self, group: str) -> list[int]:
        return [int(t) for t in _read(self._dir("cpu", "vms", group) / "tasks").split()]


class CgroupsV2(Cgroups):
    """The unified hierarchy: <root>/<name>/host and <root>/<name>/vms/<group>."""

    version = 2

    def __init__(self, name: str, root: Path) -> None:
        super().__init__(name)
        self.root = root

    def vm_dirs(self, group: str) -> list[Path]:
        return [self.root / self.name / "vms" / group]

    def _vms_parents(self) -> list[Path]:
        return [self.root / self.name / "vms"]

    def _join_file(self, directory: Path) -> Path:
        return directory / "cgroup.procs"  # v2 moves only whole processes between domain groups

    def host_dirs(self) -> list[Path]:
        return [self.root / self.name / "host"]

    def _cpu_vms_dir(self) -> Path:
        return self.root / self.name / "vms"

    def _prepare_tree(self, host_cpu_weight: int) -> None:
        available = set(_read(self.root / "cgroup.controllers").split())
        wanted = " ".join(f"+{c}" for c in ("cpu", "memory", "pids", "io") if c in available)
        top, vms = self.root / self.name, self.root / self.name / "vms"
        for parent, child in ((self.root, top), (top, vms)):
            child.mkdir(exist_ok=True)
            _write(parent / "cgroup.subtree_control", wanted)  # a group's controllers come from its parent
        _write(vms / "cgroup.subtree_control", wanted)
        self.host_dirs()[0].mkdir(exist_ok=True)
        _write(self.host_dirs()[0] / "cpu.weight", str(host_cpu_weight))

    def _write_limits(self, group: str, limits: Limits) -> None:
        directory = self.vm_dirs(group)[0]
        _write(directory / "cpu.max", f"{limits.cpu_quota_us} {CPU_PERIOD_US}")
        _write(directory / "cpu.weight", str(VM_CPU_WEIGHT))
        _write(directory / "memory.max", str(limits.memory_bytes))
        if (directory / "memory.swap.max").exists():
            _write(directory / "memory.swap.max", "0")
        _write(directory / "memory.oom.group", "1")  # every thread of the QEMU goes together
        _write(directory / "pids.max", str(limits.pids_max))
        if (directory / "io.weight").exists():
            _write(directory / "io.weight", f"default {limits.io_weight}")

    def oom_kills(self, group: str) -> int:
        return _field(self.vm_dirs(group)[0] / "memory.events", "oom_kill")

    def read_limits(self, group: str) -> Limits:
        directory = self.vm_dirs(group)[0]
        quota, period = _read(directory / "cpu.max").split()
        io = directory / "io.weight"
        weight = int(_read(io).split()[-1]) if io.exists() else 0
        cpu = CPU_PERIOD_US * 1000 if quota == "max" else int(quota) * CPU_PERIOD_US // int(period)
        return Limits(cpu, _max(_read(directory / "memory.max")), _max(_read(directory / "pids.max")), weight)

    def usage(self, group: str) -> GroupUsage:
        directory = self.vm_dirs(group)[0]
        current = int(_read(directory / "memory.current"))
        peak_file = directory / "memory.peak"  # Linux 5.19 and later; before, the current figure is all there is
        peak = int(_read(peak_file)) if peak_file.exists() else current
        cpu_ns = _field(directory / "cpu.stat", "usage_usec") * 1000
        return GroupUsage(cpu_ns, current, max(current, peak), _max(_read(directory / "memory.max")))

    def set_cpu_weight(self, group: str, weight: int) -> None:
        _write(self.vm_dirs(group)[0] / "cpu.weight", str(weight))

    def cpu_weight(self, group: str) -> int:
        return int(_read(self.vm_dirs(group)[0] / "cpu.weight"))

    def threads(self, group: str) -> list[int]:
        return [int(t) for t in _read(self.vm_dirs(group)[0] / "cgroup.threads").split()]


def detect(name: str, mounts_file: Path = Path("/proc/self/mounts")) -> Cgroups | None:
    """The host's layout: v2 if the unified hierarchy has the controllers, else v1's; None: neither."""
    v1: dict[str, Path] = {}
    v2: list[Path] = []
    for line in mounts_file.read_text().splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point, fstype, options = Path(fields[1].replace("\\040", " ")), fields[2], fields[3].split(",")
        if fstype == "cgroup2":
            v2.append(point)
        elif fstype == "cgroup":
            for controller in (*_V1_NEEDED, *_V1_OPTIONAL):
                if controller in options:
                    v1.setdefault(controller, point)
    for root in v2:
        try:
            available = set(_read(root / "cgroup.controllers").split())
        except OSError:
            continue
        if set(_V2_NEEDED) <= available:
            return CgroupsV2(name, root)
    if all(c in v1 for c in _V1_NEEDED):
        return CgroupsV1(name, v1)
    return None


def missing_controllers_text(mounts_file: Path = Path("/proc/self/mounts")) -> str:
    """Why `detect` found nothing, in one line."""
    return (
        f"neither a cgroup v2 hierarchy with the {', '.join(_V2_NEEDED)} controllers nor cgroup v1 hierarchies "
        f"for {', '.join(_V1_NEEDED)} are mounted (see {mounts_file})"
    )


def _read(path: Path) -> str:
    return path.read_text().strip()


def _mark(directory: Path, owner: str) -> None:
    """The group's directory names its maker (a trusted xattr: cgroupfs keeps it, only root reads or sets it)."""
    try:
        os.setxattr(directory, OWNER_XATTR, owner.encode())
    except OSError as exc:  # the group works unmarked; only a sweep of another manager's leaves it alone
        log.event("cgroup.mark_failed", level="warning", group=directory.name, error=str(exc))


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # a real cgroupfs has every file already
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _max(text: str) -> int:
    """A limit file's value; "max" (no limit) reads as -1."""
    return -1 if text == "max" else int(text)


def _field(path: Path, key: str) -> int:
    """`key N` from a flat keyed file (memory.events, memory.oom_control); 0 if absent."""
    for line in _read(path).splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0
