"""VM-plane benchmark: suspend, restore, pause/resume, clone times; memory; snapshot sizes.

Runs real QEMU guests (TCG here, KVM where the host has VMX/SVM) from the project's own
image, in a scratch state directory that is removed at the end. Every loop is bounded.
Usage: .venv/bin/python -m bench.vmm_bench [--cycles 20]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from vmm import probe
from vmm.manager import VmManager
from vmm.model import VmState
from vmm.settings import VmmSettings

from .stats import median, p95, table

REPO = Path(__file__).resolve().parents[1]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _kib(path: Path, field: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


async def _first_answer(vm_id: str, deadline: float = 30.0) -> None:
    """Bounded poll until the guest app answers 200."""
    await probe.wait_ready(vm_id, 8080, "/healthz", deadline, lambda: True)


async def _timed(action: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await action()
    return time.perf_counter() - start


async def run(cycles: int) -> str:
    root = Path(tempfile.mkdtemp(prefix="mvmb-", dir="/tmp"))
    settings = VmmSettings(state_dir=root)
    (root / "images").symlink_to(REPO / "var" / "images")
    manager = VmManager(settings)
    try:
        await manager.start()
        boot = await _timed(lambda: manager.create_template("demo", "demo", lambda _: None))
        rows: list[list[object]] = []
        clone, suspend, suspend_first, restore, first_http, pause, resume = ([] for _ in range(7))
        vm = None
        for i in range(cycles):
            t0 = time.perf_counter()
            created = await manager.create_vm("demo")
            await _first_answer(created.id)
            clone.append(time.perf_counter() - t0)
            if i == 0:
                vm = created
            else:
                suspend_first.append(await _timed(lambda c=created: manager.suspend(c.id)))
                await manager.delete(created.id)
        assert vm is not None
        running_kib = _kib(Path(f"/proc/{vm.pid}/smaps_rollup"), "Pss:")
        for _ in range(cycles):
            pause.append(await _timed(lambda: manager.pause(vm.id)))
            resume.append(await _timed(lambda: manager.resume(vm.id)))
        await manager.suspend(vm.id)  # first suspend streams the copy-on-write RAM; later ones do not
        await manager.ensure_running(vm.id)
        await _first_answer(vm.id)
        for _ in range(cycles):
            suspend.append(await _timed(lambda: manager.suspend(vm.id)))
            assert vm.state is VmState.SUSPENDED and vm.pid is None
            t0 = time.perf_counter()
            await manager.ensure_running(vm.id)
            restore.append(time.perf_counter() - t0)
            await _first_answer(vm.id)
            first_http.append(time.perf_counter() - t0)
        own_running_kib = _kib(Path(f"/proc/{vm.pid}/smaps_rollup"), "Pss:")
        await manager.suspend(vm.id)
        state_bytes = (manager.vm_dir(vm.id) / "state").stat().st_size
        ram_file = manager.vm_dir(vm.id) / "ram"
        ram_disk_kib = ram_file.stat().st_blocks // 2
        template_state = (settings.templates_dir / "demo" / "state").stat().st_size

        def row(name: str, values: list[float], target: str) -> None:
            rows.append([name, len(values), _ms(median(values)), _ms(p95(values)), target])

        row("clone from template → first HTTP 200", clone, "")
        row("first suspend of a clone (RAM → its own file, once)", suspend_first, "")
        row("suspend, own RAM file (device state only)", suspend, "< 20 ms")
        row("restore: process start → `cont`", restore, "< 60 ms")
        row("restore → first HTTP answer", first_http, "< 500 ms")
        row("pause (QMP stop)", pause, "")
        row("resume (QMP cont)", resume, "")
        out = [
            f"accelerator: {manager.accel.name}; template boot → snapshot: {_ms(boot)} ms",
            table(["operation", "n", "median ms", "p95 ms", "target"], rows),
            "",
            table(
                ["memory / size", "value"],
                [
                    ["host memory, running clone (PSS, copy-on-write RAM)", f"{running_kib / 1024:.1f} MiB"],
                    ["host memory, running VM with own RAM file (PSS)", f"{own_running_kib / 1024:.1f} MiB"],
                    ["host memory, suspended VM (no process)", "0 MiB (RAM file is reclaimable page cache)"],
                    ["suspended VM on disk: RAM file allocated", f"{ram_disk_kib / 1024:.1f} MiB"],
                    ["snapshot (device state) size", f"{state_bytes / 1024:.1f} KiB"],
                    ["template device state size", f"{template_state / 1024:.1f} KiB"],
                ],
            ),
        ]
        return "\n".join(out)
    finally:
        for rec in list(manager.list_vms()):
            await manager.delete(rec.id)
        await manager.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=20)
    args = parser.parse_args()
    print(asyncio.run(run(max(1, min(args.cycles, 200)))))


if __name__ == "__main__":
    main()
