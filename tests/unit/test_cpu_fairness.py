"""Busy VMs get a low CPU weight after `busy_after` seconds and their normal one back when they calm
down, read from and written to a fake cgroup v2 tree (tmp dirs), with a fake clock and fake
per-thread scheduler counters (run + run-queue wait)."""

from pathlib import Path

from vmm.cgroups import VM_CPU_WEIGHT, CgroupsV1, CgroupsV2, Limits
from vmm.cpu_fairness import CpuFairness
from vmm.settings import JailSettings

THREADS = {"busy": (11, 12), "quiet": (21, 22)}


class Host:
    """The clock, the groups and what each thread has wanted so far (nanoseconds)."""

    def __init__(self, tmp_path: Path) -> None:
        self.now = 100.0
        self.wanted: dict[int, int] = {}
        root = tmp_path / "unified"
        root.mkdir()
        (root / "cgroup.controllers").write_text("cpu memory pids\n")
        self.groups = CgroupsV2("mvm", root)
        self.groups.setup(host_cpu_weight=1000, host_pid=None)
        for vm, tids in THREADS.items():
            self.make_group(vm, tids)

    def make_group(self, vm: str, tids: tuple[int, ...]) -> None:
        directory = self.groups.root / "mvm" / "vms" / vm
        directory.mkdir(exist_ok=True)
        (directory / "memory.events").write_text("oom_kill 0\n")  # the kernel's file, there before prepare
        self.groups.prepare(vm, Limits(100_000, 512 << 20, 128, 100), str(self.groups.root))  # one vCPU
        (directory / "cgroup.threads").write_text("".join(f"{t}\n" for t in tids))
        for tid in tids:
            self.wanted.setdefault(tid, 0)

    def fairness(self, busy_cpu_weight: int = 10, busy_share: float = 0.8, busy_after: float = 3.0) -> CpuFairness:
        settings = JailSettings(busy_cpu_weight=busy_cpu_weight, busy_share=busy_share, busy_after=busy_after)
        return CpuFairness(self.groups, settings, lambda: self.now, self.wanted.get)

    def second(self, fairness: CpuFairness, busy_share: float, quiet_share: float = 0.01) -> None:
        """One second passes: the busy VM's vCPU thread wanted `busy_share` of a CPU, then a look."""
        self.now += 1.0
        self.wanted[11] += round(busy_share * 1e9)
        self.wanted[21] += round(quiet_share * 1e9)
        fairness.step()


def test_a_vm_busy_for_longer_than_busy_after_runs_at_the_busy_weight(tmp_path: Path) -> None:
    host = Host(tmp_path)
    fairness = host.fairness(busy_cpu_weight=10, busy_share=0.8, busy_after=3.0)
    fairness.step()  # the first look only learns the threads
    for _ in range(2):
        host.second(fairness, 0.95)
    assert fairness.lowered() == set(), "2 s of spinning is a burst, not yet busy"
    host.second(fairness, 0.95)
    assert fairness.lowered() == {"busy"}
    assert host.groups.cpu_weight("busy") == 10
    assert host.groups.cpu_weight("quiet") == VM_CPU_WEIGHT

    host.second(fairness, 0.05)  # it calms down: the normal weight at the first quiet interval
    assert fairness.lowered() == set()
    assert host.groups.cpu_weight("busy") == VM_CPU_WEIGHT


def test_waiting_for_a_cpu_counts_as_wanting_it(tmp_path: Path) -> None:
    """On a crowded host a spinner runs a fraction of the time and waits the rest: it is busy all the same."""
    host = Host(tmp_path)
    fairness = host.fairness(busy_after=2.0)
    fairness.step()
    for _ in range(2):
        host.now += 1.0
        host.wanted[11] += 300_000_000  # ran 0.3 s
        host.wanted[12] += 650_000_000  # another thread of it waited 0.65 s on a run queue
        fairness.step()
    assert fairness.lowered() == {"busy"}


def test_a_break_in_the_spinning_starts_the_count_again(tmp_path: Path) -> None:
    host = Host(tmp_path)
    fairness = host.fairness(busy_after=3.0)
    fairness.step()
    for share in (1.0, 1.0, 0.1, 1.0, 1.0):
        host.second(fairness, share)
    assert fairness.lowered() == set()


def test_a_group_remade_by_a_restore_gets_the_busy_weight_again_and_a_removed_one_is_forgotten(
    tmp_path: Path,
) -> None:
    host = Host(tmp_path)
    fairness = host.fairness(busy_after=1.0)
    fairness.step()
    host.second(fairness, 1.0)
    assert host.groups.cpu_weight("busy") == 10
    host.make_group("busy", (13,))  # a new QEMU in a new group: new threads, the normal weight
    assert host.groups.cpu_weight("busy") == VM_CPU_WEIGHT
    host.wanted[13] = 0
    fairness.step()
    host.now += 1.0
    host.wanted[13] += 1_000_000_000
    fairness.step()
    assert host.groups.cpu_weight("busy") == 10, "still spinning after its restore"

    directory = host.groups.root / "mvm" / "vms" / "busy"
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()
    fairness.step()
    assert fairness.lowered() == set()


def test_v1_weight_is_cpu_shares_and_threads_are_tasks(tmp_path: Path) -> None:
    groups = CgroupsV1("mvm", {c: tmp_path / c for c in ("cpu", "memory", "pids")})
    directory = tmp_path / "cpu" / "mvm" / "vms" / "v1"
    directory.mkdir(parents=True)
    (directory / "tasks").write_text("7\n8\n")
    groups.set_cpu_weight("v1", 10)
    assert (directory / "cpu.shares").read_text() == "102"
    assert groups.cpu_weight("v1") == 10
    assert groups.threads("v1") == [7, 8]
    assert groups.groups() == ["v1"]
