"""What the jail costs: clone → first answer and restore → first answer, jailed against not jailed.

One run, one demo template per mode (jailed with limits, jailed without, neither), the modes
interleaved cycle by cycle (so a busy moment of the
machine hits both alike): each cycle clones a VM and waits for its app, then suspends and wakes
another VM (device state only) and waits for its app. Also the QEMU's memory (PSS) in both modes,
and where a restore's time went in its QEMU: CPU time run, and time runnable but waiting for a CPU
(every thread's /proc/<tid>/schedstat at the first answer), which tell work from scheduling on a
loaded machine. Every loop is bounded. Usage: .venv/bin/python -m bench.jail_bench [--cycles 20]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from vmm import probe
from vmm.image import load_image
from vmm.manager import VmManager
from vmm.settings import VmmSettings

from .stats import median, p95, table
from .tools import state_dir
from .vmm_bench import _pss_mib

MODES = {"jailed + limits": (True, True), "jailed, no limits": (True, False), "neither": (False, False)}


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


async def run(cycles: int) -> str:
    root = Path(tempfile.mkdtemp(prefix="mvmj-", dir="/tmp"))
    managers: dict[str, VmManager] = {}
    try:
        base = VmmSettings(state_dir=root)
        for i, (mode, (enabled, limits)) in enumerate(MODES.items()):
            state = state_dir(root / str(i))
            jail = replace(base.jail, enabled=enabled, limits=limits)
            managers[mode] = VmManager(replace(base, state_dir=state, jail=jail))
            await managers[mode].start()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=20)
    args = parser.parse_args()
    print(asyncio.run(run(max(2, min(args.cycles, 200)))))


if __name__ == "__main__":
    main()
