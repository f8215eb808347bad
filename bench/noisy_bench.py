"""Noisy neighbours: a quiet VM's answer times while two other VMs spin every vCPU they have.

One run, three managers (cgroup limits on, busy VMs at jail.busy_cpu_weight as by default; limits on
without the busy weight; limits off; all jailed), each with a quiet demo VM and two python-sandbox
VMs. For each: the quiet VM's p50/p99 over a bounded number of requests while the other two idle,
then while both run a busy loop on every vCPU (started through the guest agent, ended by deleting
the VMs), once they have spun long enough to count as busy. The quiet VM gets 20 requests a second,
straight to the guest's app from inside its namespace (probe.http_request), so the figure is the
guest's share of the machine, not the edge's.
Goal (issue: isolation): with limits on, p99 noisy <= 1.5 x p99 idle.
Usage: .venv/bin/python -m bench.noisy_bench [--requests 200]
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
from vmm.cpu_fairness import INTERVAL
from vmm.image import load_image
from vmm.manager import VmManager
from vmm.settings import JailSettings, VmmSettings

from .stats import median, p95, p99, table
from .tools import state_dir

# mode: (cgroup limits, jail.busy_cpu_weight: 0 leaves a busy VM at the normal weight)
MODES = {"limits on": (True, JailSettings().busy_cpu_weight), "limits on, no busy weight": (True, 0),
         "limits off": (False, 0)}  # fmt: skip
SPIN = "import os\nfor _ in range((os.cpu_count() or 1) - 1):\n    os.fork()\nwhile True:\n    pass\n"
PACE = 0.05  # seconds between the quiet VM's requests: 20/s, a few tenths of its one vCPU under TCG
SPIN_FOR = 600.0  # seconds: the busy loops end with their VMs long before; a bound if the bench dies


async def _answer_times(vm_id: str, requests: int) -> list[float]:
    """One request every PACE seconds (or at once when behind): a quiet VM has think time between them."""
    times = []
    start = time.perf_counter()
    for n in range(requests):
        await asyncio.sleep(max(0.0, start + n * PACE - time.perf_counter()))
        t0 = time.perf_counter()
        status, _, _ = await probe.http_request(vm_id, 8080, "/", 30.0)
        if status != 200:
            raise RuntimeError(f"the quiet VM answered {status}")
        times.append(time.perf_counter() - t0)
    return times


async def _mode(manager: VmManager, requests: int) -> dict[str, list[float]]:
    quiet = await manager.create_vm("demo")
    noisy = [await manager.create_vm("sandbox") for _ in range(2)]
    await probe.wait_ready(quiet.id, load_image(manager.settings.images_dir, "demo").ready, 60.0, lambda: True)
    idle = await _answer_times(quiet.id, requests)
    for vm in noisy:  # started and left running: they end when their VMs are deleted below
        await manager.exec(vm.id, ["timeout", str(int(SPIN_FOR)), "python3", "-c", SPIN], [], "/", 0, 0)
    await asyncio.sleep(manager.settings.jail.busy_after + 3 * INTERVAL)  # spinning, and seen to be busy
    busy = await _answer_times(quiet.id, requests)
    for vm in (quiet, *noisy):
        await manager.delete(vm.id)
    return {"idle": idle, "noisy": busy}


async def run(requests: int) -> str:
    root = Path(tempfile.mkdtemp(prefix="mvmn-", dir="/tmp"))
    results: dict[str, dict[str, list[float]]] = {}
    try:
        base = VmmSettings(state_dir=root)
        for i, (mode, (limits, busy_weight)) in enumerate(MODES.items()):
            jail = replace(base.jail, limits=limits, busy_cpu_weight=busy_weight)
            manager = VmManager(replace(base, state_dir=state_dir(root / str(i)), jail=jail))
            await manager.start()
            try:
                await manager.create_template("demo", "demo", lambda _: None)
                await manager.create_template("sandbox", "python-sandbox", lambda _: None)
                results[mode] = await _mode(manager, requests)
            finally:
                await manager.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    for mode, got in results.items():
        idle_p99, noisy_p99 = p99(got["idle"]), p99(got["noisy"])
        rows.append([
            mode, f"{median(got['idle']) * 1000:.1f}", f"{idle_p99 * 1000:.1f}", f"{median(got['noisy']) * 1000:.1f}",
            f"{p95(got['noisy']) * 1000:.1f}", f"{noisy_p99 * 1000:.1f}", f"{noisy_p99 / idle_p99:.2f}",
        ])  # fmt: skip
    header = ["quiet demo VM, ms", "idle p50", "idle p99", "noisy p50", "noisy p95", "noisy p99", "p99 noisy/idle"]
    return table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per phase (bounded loop)")
    args = parser.parse_args()
    print(asyncio.run(run(max(10, min(args.requests, 5000)))))


if __name__ == "__main__":
    main()
