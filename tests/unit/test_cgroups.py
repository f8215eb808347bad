"""Per-VM cgroups against fake cgroupfs trees (tmp dirs): the v2 layout (Debian 12's default, absent
on this machine) and v1's, file by file as the kernel names them."""

import os
import time
from pathlib import Path

import pytest

from vmm import cgroups
from vmm.cgroups import CgroupsV1, CgroupsV2, GroupUsage, Limits, limits_for


def _mounts(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "mounts"
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def _fake_v2(tmp_path: Path) -> Path:
    root = tmp_path / "unified"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    return root


def test_limits_follow_the_vm_size() -> None:
    limits = limits_for(vcpus=2, memory_mb=512, cpu_share=0.5, overhead_mb=160, pids_max=128, io_weight=100)
    assert limits == Limits(cpu_quota_us=100_000, memory_bytes=672 << 20, pids_max=128, io_weight=100)
    assert limits.memory_mb == 672
    assert limits_for(1, 256, 1.0, 160, 128, 100).cpu_quota_us == 100_000


def test_detect_prefers_v2_with_controllers(tmp_path: Path) -> None:
    root = _fake_v2(tmp_path)
    found = cgroups.detect("mvm", _mounts(tmp_path, [f"cgroup2 {root} cgroup2 rw,nosuid 0 0"]))
    assert isinstance(found, CgroupsV2) and found.root == root


def test_detect_falls_back_to_v1_when_the_unified_hierarchy_is_empty(tmp_path: Path) -> None:
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("hugetlb\n")
    lines = [f"cgroup2 {unified} cgroup2 rw 0 0"] + [
        f"cgroup {tmp_path / c} cgroup rw,relatime,{c} 0 0" for c in ("cpu", "memory", "pids", "blkio")
    ]
    found = cgroups.detect("mvm", _mounts(tmp_path, lines))
    assert isinstance(found, CgroupsV1)
    assert found.mounts == {c: tmp_path / c for c in ("cpu", "memory", "pids", "blkio")}


def test_detect_finds_nothing_without_controllers(tmp_path: Path) -> None:
    assert cgroups.detect("mvm", _mounts(tmp_path, ["tmpfs /sys/fs/cgroup tmpfs rw 0 0"])) is None


def test_v2_tree_limits_and_oom(tmp_path: Path) -> None:
    root = _fake_v2(tmp_path)
    groups = CgroupsV2("mvm", root)
    groups.setup(host_cpu_weight=1000, host_pid=4242)
    assert (root / "cgroup.subtree_control").read_text() == "+cpu +memory +pids +io"
    assert (root / "mvm" / "vms" / "cgroup.subtree_control").read_text() == "+cpu +memory +pids +io"
    assert (root / "mvm" / "host" / "cpu.weight").read_text() == "1000"
    assert (root / "mvm" / "host" / "cgroup.procs").read_text() == "4242"

    vm = root / "mvm" / "vms" / "v1"
    vm.mkdir(parents=True)
    for name in ("memory.swap.max", "io.weight"):
        (vm / name).write_text("max\n")
    (vm / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n")
    joins = groups.prepare("v1", Limits(150_000, 672 << 20, 128, 100), str(tmp_path))
    assert joins == [vm / "cgroup.procs"]  # v2 moves whole processes only
    assert (vm / "cpu.max").read_text() == "150000 100000"
    assert (vm / "memory.max").read_text() == str(672 << 20)
    assert (vm / "memory.swap.max").read_text() == "0"
    assert (vm / "memory.oom.group").read_text() == "1"
    assert (vm / "pids.max").read_text() == "128"
    assert (vm / "io.weight").read_text() == "default 100"
    assert groups.read_limits("v1") == Limits(150_000, 672 << 20, 128, 100)
    assert not groups.oom_killed("v1")
    (vm / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 1\n")
    assert groups.oom_killed("v1")
    assert groups.memory_limit_mb("v1") == 672


def test_v1_tree_limits_and_oom(tmp_path: Path) -> None:
    mounts = {c: tmp_path / c for c in ("cpu", "memory", "pids")}
    for point in mounts.values():
        point.mkdir()
    groups = CgroupsV1("mvm", mounts)
    groups.setup(host_cpu_weight=1000, host_pid=77)
    assert (mounts["cpu"] / "mvm" / "host" / "cpu.shares").read_text() == "10240"
    assert (mounts["cpu"] / "mvm" / "host" / "cgroup.procs").read_text() == "77"
    assert not (mounts["memory"] / "mvm" / "host").exists()  # the host's memory stays where it was

    memory = mounts["memory"] / "mvm" / "vms" / "v1"
    memory.mkdir(parents=True)
    (memory / "memory.memsw.limit_in_bytes").write_text("9223372036854771712\n")
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    joins = groups.prepare("v1", Limits(200_000, 512 << 20, 64, 100), str(tmp_path))
    # the helper moves its one thread itself through v1's `tasks`: no global threadgroup lock
    assert joins == [mounts[c] / "mvm" / "vms" / "v1" / "tasks" for c in ("cpu", "memory", "pids")]
    cpu = mounts["cpu"] / "mvm" / "vms" / "v1"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "200000"
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (memory / "memory.limit_in_bytes").read_text() == str(512 << 20)
    assert (memory / "memory.memsw.limit_in_bytes").read_text() == str(512 << 20)
    assert (memory / "memory.swappiness").read_text() == "0"
    assert groups.read_limits("v1") == Limits(200_000, 512 << 20, 64, 0)
    assert not groups.oom_killed("v1")  # the two kills happened before this QEMU's group was prepared
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert groups.oom_killed("v1")


def test_remove_leaves_a_busy_group_and_forgets_a_gone_one(tmp_path: Path) -> None:
    root = _fake_v2(tmp_path)
    groups = CgroupsV2("mvm", root)
    groups.setup(1000, None)
    (root / "mvm" / "vms" / "v1").mkdir()
    (root / "mvm" / "vms" / "v1" / "memory.events").write_text("oom_kill 0\n")
    groups.prepare("v1", Limits(100_000, 1 << 30, 128, 100), str(tmp_path))
    assert not groups.remove("v1")  # a directory with files is "busy" here, as one with a task is on a real cgroupfs
    assert (root / "mvm" / "vms" / "v1").exists()
    groups.remove("never-made")


def test_setup_failure_is_one_line(tmp_path: Path) -> None:
    groups = CgroupsV2("mvm", tmp_path / "missing")
    with pytest.raises(Exception, match=r"^cgroup v2: cannot set up 'mvm': "):
        groups.setup(1000, None)


def test_v2_usage_from_cpu_stat_and_memory(tmp_path: Path) -> None:
    vm = tmp_path / "mvm" / "vms" / "v1"
    vm.mkdir(parents=True)
    (vm / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    (vm / "memory.current").write_text("104857600\n")
    (vm / "memory.peak").write_text("209715200\n")
    (vm / "memory.max").write_text("max\n")
    groups = CgroupsV2("mvm", tmp_path)
    assert groups.usage("v1") == GroupUsage(2_500_000_000, 100 << 20, 200 << 20, memory_limit_bytes=-1)
    (vm / "memory.peak").unlink()  # before Linux 5.19: no peak, the current figure stands for it
    assert groups.usage("v1").memory_peak_bytes == 100 << 20
    with pytest.raises(OSError):
        groups.usage("gone")


def test_v1_usage_from_cpuacct_and_memory(tmp_path: Path) -> None:
    mounts = {c: tmp_path / c for c in ("cpu", "cpuacct", "memory", "pids")}
    for controller in ("cpuacct", "memory"):
        (mounts[controller] / "mvm" / "vms" / "v1").mkdir(parents=True)
    (mounts["cpuacct"] / "mvm" / "vms" / "v1" / "cpuacct.usage").write_text("1500000000\n")
    memory = mounts["memory"] / "mvm" / "vms" / "v1"
    (memory / "memory.usage_in_bytes").write_text(f"{64 << 20}\n")
    (memory / "memory.max_usage_in_bytes").write_text(f"{96 << 20}\n")
    (memory / "memory.limit_in_bytes").write_text(f"{672 << 20}\n")
    assert CgroupsV1("mvm", mounts).usage("v1") == GroupUsage(1_500_000_000, 64 << 20, 96 << 20, 672 << 20)
    without_cpuacct = {c: p for c, p in mounts.items() if c != "cpuacct"}
    assert CgroupsV1("mvm", without_cpuacct).usage("v1") == GroupUsage(0, 64 << 20, 96 << 20, 672 << 20)
    with pytest.raises(OSError):
        CgroupsV1("mvm", mounts).usage("gone")


def test_v1_cpuacct_joins_the_groups_once_when_mounted_with_cpu(tmp_path: Path) -> None:
    """cpuacct on its own hierarchy (this machine) gets a group of its own; mounted with cpu, none twice."""
    apart = {c: tmp_path / "apart" / c for c in ("cpu", "cpuacct", "memory", "pids")}
    order = ("cpu", "memory", "pids", "cpuacct")
    assert CgroupsV1("mvm", apart).vm_dirs("v1") == [apart[c] / "mvm" / "vms" / "v1" for c in order]
    shared = tmp_path / "cpu,cpuacct"
    together = {"cpu": shared, "cpuacct": shared, "memory": tmp_path / "memory", "pids": tmp_path / "pids"}
    assert CgroupsV1("mvm", together).vm_dirs("v1") == [
        shared / "mvm" / "vms" / "v1",
        tmp_path / "memory" / "mvm" / "vms" / "v1",
        tmp_path / "pids" / "mvm" / "vms" / "v1",
    ]
    lines = [f"cgroup {shared} cgroup rw,relatime,cpu,cpuacct 0 0"] + [
        f"cgroup {tmp_path / c} cgroup rw,relatime,{c} 0 0" for c in ("memory", "pids")
    ]
    found = cgroups.detect("mvm", _mounts(tmp_path, lines))
    assert isinstance(found, CgroupsV1) and found.mounts["cpuacct"] == shared


def _group(groups: cgroups.Cgroups, name: str, owner: Path | None, age: float) -> None:
    """A group as a manager of `owner` left it (unmarked: made before groups were marked), `age` seconds old."""
    for directory in groups.vm_dirs(name):
        directory.mkdir(parents=True)
        if owner is not None:
            os.setxattr(directory, cgroups.OWNER_XATTR, str(owner).encode())  # trusted.*: root, as the manager
        made = time.time() - age
        os.utime(directory, (made, made))


@pytest.mark.skipif(os.geteuid() != 0, reason="trusted xattrs need root, as the manager has")
@pytest.mark.parametrize("version", [1, 2])
def test_a_sweep_removes_only_groups_no_qemu_will_join(tmp_path: Path, version: int) -> None:
    """Its own empty groups past the grace, those of a state directory that is gone, and VMs it names as
    gone; never another live manager's (a fleet host sharing the tree), a young one, or one with a task."""
    if version == 2:
        groups: cgroups.Cgroups = CgroupsV2("mvm", _fake_v2(tmp_path))
    else:
        mounts = {c: tmp_path / c for c in ("cpu", "memory", "pids", "blkio")}
        groups = CgroupsV1("mvm", mounts)
    mine, other, dead = tmp_path / "state", tmp_path / "other-state", tmp_path / "removed-state"
    mine.mkdir()
    other.mkdir()
    old = cgroups.GROUP_GRACE + 5
    _group(groups, "v-old-mine", mine, old)
    _group(groups, "v-young-mine", mine, 1)  # its QEMU may be joining it right now
    _group(groups, "v-other", other, old)
    _group(groups, "v-dead-owner", dead, old)
    _group(groups, "v-unmarked", None, old)
    _group(groups, "v-unmarked-gone", None, 1)
    _group(groups, "v-other-gone", other, old)  # a VM that moved to a host on this machine: that host's now
    _group(groups, "v-busy", mine, old)
    (groups.vm_dirs("v-busy")[0] / "tasks").write_text("4242\n")  # rmdir of a group with a task: EBUSY (here ENOTEMPTY)

    swept = groups.sweep(str(mine), gone={"v-unmarked-gone", "v-other-gone"})

    assert swept == ["v-dead-owner", "v-old-mine", "v-unmarked-gone"]
    left = {p.name for parent in groups._vms_parents() for p in parent.iterdir()}
    assert left == {"v-young-mine", "v-other", "v-unmarked", "v-other-gone", "v-busy"}
    assert all(not d.exists() for d in groups.vm_dirs("v-old-mine")), "gone from every hierarchy"


@pytest.mark.skipif(os.geteuid() != 0, reason="trusted xattrs need root, as the manager has")
def test_prepare_marks_the_group_with_its_state_directory(tmp_path: Path) -> None:
    groups = CgroupsV1("mvm", {c: tmp_path / c for c in ("cpu", "memory", "pids")})
    (tmp_path / "memory" / "mvm" / "vms" / "v1").mkdir(parents=True)
    (tmp_path / "memory" / "mvm" / "vms" / "v1" / "memory.oom_control").write_text("oom_kill 0\n")
    groups.prepare("v1", Limits(100_000, 1 << 30, 128, 100), "/srv/state")
    for directory in groups.vm_dirs("v1"):
        assert os.getxattr(directory, cgroups.OWNER_XATTR) == b"/srv/state"
