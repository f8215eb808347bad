"""What the jail costs: clone → first answer and restore → first answer, jailed against not jailed.

One run, one demo template per mode (jailed with limits, jailed without, neither), the modes
interleaved cycle by cycle (so a busy moment of the
machine hits both alike): each cycle clones a VM and waits for its app, then suspends and wakes
another VM (device state only) and waits for its app. Also the QEMU's memory (PSS) in both modes,
and where a restore's time went in its QEMU: CPU time run, and time runnable but waiting for a CPU
(every thread's /proc/<tid>/schedstat at the first answer), which tell work from scheduling on a
loaded machine. Every loop is bounded. Usage: .venv/bin/python -m bench.jail_bench [--cycles 20]

The limits' manager puts its process in the host's group (the host's reserved CPU weight), and
every QEMU the other modes start would inherit it, so those QEMUs would run at the host's weight
where a manager without limits leaves its QEMUs in its own group. This process goes back to its
own CPU group once the managers are up. The cgroup tree is the bench's own (removed at the end):
VMs of other managers on this machine (tests, other benches) share no group with the measured one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from vmm import cgroups, probe
from vmm.cgroups import CgroupsV1, CgroupsV2
from vmm.image import load_image
from vmm.manager import VmManager
from vmm.settings import VmmSettings

from .stats import median, p95, table
from .tools import state_dir
from .vmm_bench import _pss_mib

MODES = {"jailed + limits": (True, True), "jailed, no limits": (True, False), "neither": (False, False)}
TREE = f"microvm-edge-bench-{os.getpid()}"  # the bench's own cgroup tree: <TREE>/host and <TREE>/vms/<vm>


async def _cycle(manager: VmManager, kept: str, results: dict[str, list[float]]) -> None:
    ready = load_image(manager.settings.images_dir, "demo").ready
    t0 = time.perf_counter()
    vm = await manager.create_vm("demo")
    await probe.wait_ready(vm.id, ready, 60.0, lambda: True)
    results["clone"].append(time.perf_counter() - t0)
    await manager.delete(vm.id)
    await manager.suspend(kept)
    t0 = time.perf_counter()
    await manager.ensure_running(kept)
    await probe.wait_ready(kept, ready, 60.0, lambda: True)
    results["restore"].append(time.perf_counter() - t0)
    pid = manager.get(kept).pid
    assert pid is not None
    run, wait = _scheduled(pid)
    results["restore run"].append(run)
    results["restore wait"].append(wait)


def _scheduled(pid: int) -> tuple[float, float]:
    """Seconds the process's threads have run on a CPU, and waited runnable for one, since it started."""
    run = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ran, waited, _ = (task / "schedstat").read_text().split()
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
        run, wait = run + int(ran), wait + int(waited)
    return run / 1e9, wait / 1e9


def _cpu_group() -> Path | None:
    """This process's group in the hierarchy with the cpu controller (its children start in it)."""
    groups = cgroups.detect(TREE)
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if isinstance(groups, CgroupsV1) and "cpu" in controllers.split(","):
            return groups.mounts["cpu"] / path.lstrip("/")
        if isinstance(groups, CgroupsV2) and controllers == "":
            return groups.root / path.lstrip("/")
    return None


def _remove_tree() -> None:
    """The bench's cgroup tree, deepest groups first (this process has left it; its VMs are deleted)."""
    groups = cgroups.detect(TREE)
    points = set(groups.mounts.values()) if isinstance(groups, CgroupsV1) else set()
    if isinstance(groups, CgroupsV2):
        points = {groups.root}
    for top in (point / TREE for point in points):
        if top.is_dir():
            for directory in sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
                with contextlib.suppress(OSError):
                    directory.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()


async def run(cycles: int) -> str:
    root = Path(tempfile.mkdtemp(prefix="mvmj-", dir="/tmp"))
    managers: dict[str, VmManager] = {}
    home = _cpu_group()
    try:
        base = VmmSettings(state_dir=root)
        for i, (mode, (enabled, limits)) in enumerate(MODES.items()):
            state = state_dir(root / str(i))
            jail = replace(base.jail, enabled=enabled, limits=limits, cgroup_name=TREE)
            managers[mode] = VmManager(replace(base, state_dir=state, jail=jail))
            await managers[mode].start()
            if home is not None:
                (home / "cgroup.procs").write_text(str(os.getpid()))  # out of the host group (see above)
            await managers[mode].create_template("demo", "demo", lambda _: None)
        kept = {mode: (await m.create_vm("demo")).id for mode, m in managers.items()}
        for mode, m in managers.items():  # the first suspend moves RAM to the VM's own file: not measured
            await m.suspend(kept[mode])
            await m.ensure_running(kept[mode])
        keys = ("clone", "restore", "restore run", "restore wait")
        results: dict[str, dict[str, list[float]]] = {mode: {key: [] for key in keys} for mode in MODES}
        for _ in range(cycles):
            for mode in MODES:
                await _cycle(managers[mode], kept[mode], results[mode])
        rows = []
        for key, name in (
            ("clone", "clone → first answer"), ("restore", "restore → first answer"),
            ("restore run", "restored QEMU's CPU time to its first answer"),
            ("restore wait", "restored QEMU's wait for a CPU to its first answer"),
        ):  # fmt: skip
            free = median(results["neither"][key])
            for mode in MODES:
                got = results[mode][key]
                rows.append([name, mode, cycles, f"{median(got) * 1000:.1f}", f"{p95(got) * 1000:.1f}",
                             f"{(median(got) - free) * 1000:+.1f}"])  # fmt: skip
        memory = [[mode, f"{_pss_mib(m.get(kept[mode]).pid):.1f} MiB"] for mode, m in managers.items()]
        return "\n".join([
            table(["demo", "mode", "n", "median ms", "p95 ms", "cost ms (medians, against neither)"], rows),
            "",
            table(["running restored demo VM", "QEMU PSS"], memory),
        ])  # fmt: skip
    finally:
        for m in managers.values():
            for rec in list(m.list_vms()):
                await m.delete(rec.id)
            await m.close()
        shutil.rmtree(root, ignore_errors=True)
        if home is not None:
            (home / "cgroup.procs").write_text(str(os.getpid()))
        _remove_tree()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=20)
    args = parser.parse_args()
    print(asyncio.run(run(max(2, min(args.cycles, 200)))))


if __name__ == "__main__":
    main()
