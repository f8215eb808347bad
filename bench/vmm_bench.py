"""VM-plane benchmark: template, clone, suspend, restore, pause/resume times; memory; disk and snapshot sizes.

Runs real QEMU guests (TCG here, KVM where the host has VMX/SVM) from the project's own
images, side by side in one run: the busybox initramfs demo and a disk image built from a
Dockerfile (python-sandbox by default), in a scratch state directory removed at the end.
Every loop is bounded.
Usage: .venv/bin/python -m bench.vmm_bench [--cycles 20] [--disk-image python-sandbox]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from vmm import disks, probe
from vmm.image import Readiness, load_image
from vmm.manager import VmManager
from vmm.model import VmState
from vmm.network import netns
from vmm.settings import VmmSettings

from .stats import median, p95, p99, table

REPO = Path(__file__).resolve().parents[1]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _kib(path: Path, field: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


async def _first_answer(vm_id: str, ready: Readiness, deadline: float = 60.0) -> None:
    """Bounded poll until the guest app answers as its image says."""
    await probe.wait_ready(vm_id, ready, deadline, lambda: True)


async def _timed(action: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await action()
    return time.perf_counter() - start


async def _put_file(vm_id: str, path: str, size: int) -> None:
    """PUT `size` random bytes to the python-sandbox's /files (from inside the VM's namespace)."""
    sock = await netns.connect_guest(vm_id, 8080, 10.0)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        head = f"PUT /files/{path} HTTP/1.1\r\nHost: guest\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode() + os.urandom(size))
        status = (await asyncio.wait_for(reader.read(), 60.0)).split(b" ", 2)[1]
        if status != b"201":
            raise RuntimeError(f"PUT /files/{path} answered {status!r}")
    finally:
        writer.close()


def _pss_mib(pid: int | None) -> float:
    return _kib(Path(f"/proc/{pid}/smaps_rollup"), "Pss:") / 1024 if pid else 0.0


async def _bench_template(manager: VmManager, name: str, image: str, cycles: int) -> dict[str, Any]:
    """Template creation, clone → first answer, suspend, restore → first answer, memory: one image."""
    ready = load_image(manager.settings.images_dir, image).ready
    boot = await _timed(lambda: manager.create_template(name, image, lambda _: None))
    clone: list[float] = []
    suspend_first: list[float] = []
    suspend: list[float] = []
    restore: list[float] = []
    first_answer: list[float] = []
    pause: list[float] = []
    resume: list[float] = []
    vm = None
    for i in range(cycles):
        t0 = time.perf_counter()
        created = await manager.create_vm(name)
        await _first_answer(created.id, ready)
        clone.append(time.perf_counter() - t0)
        if i == 0:
            vm = created
        else:
            suspend_first.append(await _timed(functools.partial(manager.suspend, created.id)))
            await manager.delete(created.id)
    assert vm is not None
    running_mib = _pss_mib(vm.pid)
    for _ in range(cycles):
        pause.append(await _timed(lambda: manager.pause(vm.id)))
        resume.append(await _timed(lambda: manager.resume(vm.id)))
    await manager.suspend(vm.id)  # first suspend streams the copy-on-write RAM; later ones do not
    await manager.ensure_running(vm.id)
    await _first_answer(vm.id, ready)
    for _ in range(cycles):
        suspend.append(await _timed(lambda: manager.suspend(vm.id)))
        assert vm.state is VmState.SUSPENDED and vm.pid is None
        t0 = time.perf_counter()
        await manager.ensure_running(vm.id)
        restore.append(time.perf_counter() - t0)
        await _first_answer(vm.id, ready)
        first_answer.append(time.perf_counter() - t0)
    result: dict[str, Any] = {
        "template": boot, "clone": clone, "suspend_first": suspend_first, "suspend": suspend, "restore": restore,
        "first_answer": first_answer, "pause": pause, "resume": resume, "running_mib": running_mib,
        "own_running_mib": _pss_mib(vm.pid),
    }  # fmt: skip
    overlay = manager.vm_dir(vm.id) / "disk.qcow2"
    if overlay.exists():
        result.update(await _bench_agent(manager, vm.id, ready, cycles))
        before = disks.allocated_bytes(overlay)
        await _put_file(vm.id, "bench-10mib.bin", 10 * 2**20)
        await manager.suspend(vm.id)  # the guest's page cache is flushed by `stop`: the overlay holds it all
        result["disk_written"] = disks.allocated_bytes(overlay) - before
        result["disk_total"] = disks.allocated_bytes(overlay)
    await manager.suspend(vm.id)
    result["state_bytes"] = (manager.vm_dir(vm.id) / "state").stat().st_size
    result["ram_disk_mib"] = (manager.vm_dir(vm.id) / "ram").stat().st_blocks / 2048
    await manager.delete(vm.id)
    return result


async def _bench_agent(manager: VmManager, vm_id: str, ready: Readiness, cycles: int) -> dict[str, Any]:
    """The guest agent: a sync's round trip (what it adds to every wake), exec `true`, exec throughput."""
    settings = manager.settings
    unsynced = []  # restore -> first answer without the sync, to set against the same with it
    for _ in range(cycles):
        await manager.suspend(vm_id)
        manager.settings = replace(settings, guest_sync=False)
        t0 = time.perf_counter()
        await manager.ensure_running(vm_id)
        await _first_answer(vm_id, ready)
        unsynced.append(time.perf_counter() - t0)
        manager.settings = settings
    agent = manager.records.get(vm_id).agent
    assert agent is not None
    sync = [(await agent.sync(vm_id, 5.0)).took_ms / 1000 for _ in range(cycles)]
    exec_true = []
    for _ in range(cycles * 5):
        t0 = time.perf_counter()
        async for _event in await manager.exec(vm_id, ["true"], [], "/", 0, 0):
            pass
        exec_true.append(time.perf_counter() - t0)
    size = 100 * 2**20
    t0 = time.perf_counter()
    received = 0
    async for event in await manager.exec(vm_id, ["head", "-c", str(size), "/dev/zero"], [], "/", 0, 0):
        received += len(event.data) if event.kind == "stdout" else 0
    assert received == size
    exec_mb_s = size / 2**20 / (time.perf_counter() - t0)  # before the files: their time is not the stream's
    files = await _bench_files(manager, vm_id)
    return {"sync": sync, "unsynced_first_answer": unsynced, "exec_true": exec_true,
            "exec_mb_s": exec_mb_s, **files}  # fmt: skip


async def _bench_files(manager: VmManager, vm_id: str, size: int = 50 * 2**20) -> dict[str, float]:
    """MiB/s of 50 MiB through the agent's file tools, against the app's own /files over a direct socket."""
    data = os.urandom(size)
    t0 = time.perf_counter()
    ex = await manager.exec(vm_id, ["/mvm/init", "file-put", "/data/agent.bin"], [], "/", 0, 0)
    for start in range(0, size, 1 << 16):
        await ex.write_stdin(data[start : start + (1 << 16)])
    await ex.write_stdin(b"")
    async for _event in ex:
        pass
    agent_up = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = 0
    async for event in await manager.exec(vm_id, ["/mvm/init", "file-get", "/data/agent.bin"], [], "/", 0, 0):
        got += len(event.data) if event.kind == "stdout" else 0
    agent_down = time.perf_counter() - t0
    assert got == size + 1  # the "F" marker
    t0 = time.perf_counter()
    await _put_file(vm_id, "direct.bin", size)
    direct_up = time.perf_counter() - t0
    t0 = time.perf_counter()
    status, _, body = await probe.http_request(vm_id, 8080, "/files/direct.bin", 120.0)
    direct_down = time.perf_counter() - t0
    assert status == 200 and len(body) == size
    mib = size / 2**20
    return {"agent_up": mib / agent_up, "agent_down": mib / agent_down,
            "direct_up": mib / direct_up, "direct_down": mib / direct_down}  # fmt: skip


async def run(cycles: int, disk_image: str) -> str:
    root = Path(tempfile.mkdtemp(prefix="mvmb-", dir="/tmp"))
    settings = VmmSettings(state_dir=root)
    (root / "images").symlink_to(REPO / "var" / "images")
    manager = VmManager(settings)
    try:
        await manager.start()
        demo = await _bench_template(manager, "demo", "demo", cycles)
        disk = await _bench_template(manager, "disk", disk_image, cycles)
        rows: list[list[object]] = []

        def row(name: str, key: str, target: str = "") -> None:
            a, b = demo[key], disk[key]
            ratio = median(b) / median(a) if median(a) else 0.0
            cells = [_ms(median(a)), _ms(p95(a)), _ms(median(b)), _ms(p95(b))]
            rows.append([name, len(a), *cells, f"{ratio:.2f}", target])

        row("clone from template → first answer", "clone")
        row("first suspend of a clone (RAM → its own file, once)", "suspend_first")
        row("suspend, own RAM file (device state only)", "suspend", "< 20 ms")
        row("restore: process start → `cont`", "restore", "< 60 ms")
        row("restore → first answer", "first_answer", "< 500 ms")
        row("pause (QMP stop)", "pause")
        row("resume (QMP cont)", "resume")
        headers = ["operation", "n", "demo median ms", "demo p95 ms", "disk median ms", "disk p95 ms", "disk / demo"]
        sizes = [
            ["host memory, running clone (PSS)", f"{demo['running_mib']:.1f} MiB", f"{disk['running_mib']:.1f} MiB"],
            ["host memory, running VM, own RAM file (PSS)", f"{demo['own_running_mib']:.1f} MiB",
             f"{disk['own_running_mib']:.1f} MiB"],
            ["host memory, suspended VM", "0 MiB (no process)", "0 MiB (no process)"],
            ["suspended VM: RAM file allocated", f"{demo['ram_disk_mib']:.1f} MiB", f"{disk['ram_disk_mib']:.1f} MiB"],
            ["snapshot (device state)", f"{demo['state_bytes'] / 1024:.1f} KiB",
             f"{disk['state_bytes'] / 1024:.1f} KiB"],
            ["VM disk overlay: growth from writing 10 MiB", "-", f"{disk['disk_written'] / 2**20:.1f} MiB"],
            ["VM disk overlay: total allocated", "-", f"{disk['disk_total'] / 2**20:.1f} MiB"],
        ]
        agent_rows = [
            [name, len(disk[key]), _ms(median(disk[key])), _ms(p95(disk[key])), _ms(p99(disk[key])),
             _ms(max(disk[key]))]
            for name, key in (
                ("sync round trip, warm guest (clock, 64 B entropy, hostname)", "sync"),
                ("restore → first answer with the sync off", "unsynced_first_answer"),
                ("exec `true`, round trip", "exec_true"),
            )
        ]  # fmt: skip
        transfer = [
            ["upload 50 MiB", f"{disk['agent_up']:.1f}", f"{disk['direct_up']:.1f}",
             f"{disk['agent_up'] / disk['direct_up']:.2f}"],
            ["download 50 MiB", f"{disk['agent_down']:.1f}", f"{disk['direct_down']:.1f}",
             f"{disk['agent_down'] / disk['direct_down']:.2f}"],
        ]  # fmt: skip
        lines = [
            f"accelerator: {manager.accel.name}; cycles: {cycles}; demo = busybox initramfs, "
            f"disk = {disk_image} (root disk, qcow2 overlay per VM)",
            f"template creation (boot → ready → snapshot): demo {_ms(demo['template'])} ms, "
            f"{disk_image} {_ms(disk['template'])} ms",
            "",
            table([*headers, "target"], rows),
            "",
            table(["memory / size", "demo", disk_image], sizes),
            "",
            table([f"guest agent ({disk_image})", "n", "median ms", "p95 ms", "p99 ms", "max ms"], agent_rows),
            f"the sync adds {_ms(median(disk['first_answer']) - median(disk['unsynced_first_answer']))} ms to "
            "restore → first answer (median with it, in the first table, minus median without it)",
            f"exec throughput (100 MiB of stdout): {disk['exec_mb_s']:.0f} MiB/s",
            "",
            table(["files", "agent MiB/s", "direct to the app MiB/s", "agent / direct"], transfer),
        ]
        return "\n".join(lines)
    finally:
        for rec in list(manager.list_vms()):
            await manager.delete(rec.id)
        await manager.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--disk-image", default="python-sandbox", help="the disk image to compare with the demo")
    args = parser.parse_args()
    print(asyncio.run(run(max(2, min(args.cycles, 200)), args.disk_image)))


if __name__ == "__main__":
    main()
