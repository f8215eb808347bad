"""Where a guest agent call's time goes: the channel, the guest's process spawn, the host's share of a stream.

One python-sandbox template and two clones in a scratch state directory (removed at the end):
- the channel's round trip (a warm sync: no process in the guest) against exec `true`, and
  against `true` spawned inside the guest by Python (the floor for any channel: TCG runs the
  guest's fork and exec);
- the same with the guest's ASLR off, and `true` spawned under `setarch -R` (does TCG translate the
  dynamic loader and libc again at every exec because they land at new addresses?);
- 100 MiB of exec stdout: MiB/s, the frames' sizes, and the host CPU the manager spent on it;
- the same 100 MiB from a guest process over TCP to the host, read inside the VM's namespace as
  the edge reads the app: the ceiling of an agent that listened on the guest's own address;
- files through the agent against the app's own HTTP (bench.vmm_bench's transfer);
- exec `true` in one VM while the other's root floods its channel with tiny frames for no call,
  until the manager ends that channel.
Every loop is bounded. Usage: .venv/bin/python -m bench.agent_bench [--cycles 30]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import tempfile
import time
from pathlib import Path

from tests.e2e.test_hostile_guest_agent import FLOOD
from vmm.agent import MAX_NOISE_FRAMES
from vmm.image import load_image
from vmm.manager import VmManager
from vmm.network import netns
from vmm.settings import VmmSettings

from .stats import median, p95, table
from .vmm_bench import REPO, _bench_files, _first_answer

IMAGE = "python-sandbox"
_GUEST_SPAWN = """
import os, sys, time
for _ in range({n}):
    t = time.perf_counter()
    os.waitpid(os.posix_spawn("/bin/true", ["true"], {{}}), 0)
    print((time.perf_counter() - t) * 1000)
"""

_TCP_PORT = 7999
_GUEST_SEND = """
import socket
srv = socket.create_server(("0.0.0.0", {port}))
print("listening", flush=True)
conn, _ = srv.accept()
block = bytes(1 << 20)
for _ in range({mib}):
    conn.sendall(block)
conn.close()
"""


_ASLR = "/proc/sys/kernel/randomize_va_space"


async def _aslr(manager: VmManager, vm_id: str, cycles: int) -> str:
    """Issue 17's hypothesis: TCG translates ld.so and libc again at every exec because ASLR maps them at new
    addresses. exec `true` with the guest's ASLR on (2) and off (0), and `true` spawned inside the guest
    normally and under `setarch -R` (ADDR_NO_RANDOMIZE, inherited), interleaved in two rounds so the
    machine's load falls on both alike. The guest's setting goes back to 2 at the end."""
    rows: dict[str, list[float]] = {}
    for _ in range(2):
        for setting in ("2", "0"):
            await _output(manager, vm_id, ["sh", "-c", f"echo {setting} > {_ASLR}"])
            rows.setdefault(f"exec `true`, guest's randomize_va_space={setting}", []).extend(
                await _exec_true(manager, vm_id, cycles))  # fmt: skip
        await _output(manager, vm_id, ["sh", "-c", f"echo 2 > {_ASLR}"])
        for prefix, name in (([], "ASLR on"), (["setarch", "x86_64", "-R"], "under `setarch -R`")):
            out = await _output(manager, vm_id, [*prefix, "python3", "-c", _GUEST_SPAWN.format(n=cycles)])
            rows.setdefault(f"`true` spawned inside the guest, {name}", []).extend(float(x) for x in out.split())
    return table(
        ["ASLR and TCG (python-sandbox)", "n", "median ms", "p95 ms"],
        [[name, len(xs), f"{median(xs):.1f}", f"{p95(xs):.1f}"] for name, xs in rows.items()],
    )


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _output(manager: VmManager, vm_id: str, argv: list[str]) -> bytes:
    out = b""
    async for event in await manager.exec(vm_id, argv, [], "/", 0, 0):
        out += event.data if event.kind == "stdout" else b""
    return out


async def _exec_true(manager: VmManager, vm_id: str, n: int) -> list[float]:
    took = []
    for _ in range(n):
        t0 = time.perf_counter()
        await _output(manager, vm_id, ["true"])
        took.append((time.perf_counter() - t0) * 1000)
    return took


async def run(cycles: int) -> str:
    root = Path(tempfile.mkdtemp(prefix="mvmab-", dir="/tmp"))
    settings = VmmSettings(state_dir=root, boot_timeout=300.0)
    (root / "images").symlink_to(REPO / "var" / "images")
    manager = VmManager(settings)
    try:
        await manager.start()
        ready = load_image(settings.images_dir, IMAGE).ready
        await manager.create_template("bench", IMAGE, lambda _: None)
        vm = await manager.create_vm("bench")
        await _first_answer(vm.id, ready)
        agent = manager.records.get(vm.id).agent
        assert agent is not None
        sync = [(await agent.sync(vm.id, 5.0)).took_ms for _ in range(cycles)]
        exec_true = await _exec_true(manager, vm.id, cycles)
        spawn = [float(x) for x in (await _output(manager, vm.id, ["python3", "-c", _GUEST_SPAWN.format(n=cycles)]))
                 .split()]  # fmt: skip
        aslr = await _aslr(manager, vm.id, cycles)
        size, frames, cpu0, t0 = 100 * 2**20, [], _cpu(), time.perf_counter()
        async for event in await manager.exec(vm.id, ["head", "-c", str(size), "/dev/zero"], [], "/", 0, 0):
            frames += [len(event.data)] if event.kind == "stdout" else []
        wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
        assert sum(frames) == size
        tcp = await _tcp_ceiling(manager, vm.id, size)
        files = await _bench_files(manager, vm.id)
        flooder = await manager.create_vm("bench")
        await _first_answer(flooder.id, ready)
        hostile = await manager.exec(flooder.id, ["python3", "-c", FLOOD], [], "/", 0, 0)
        flood = manager.records.get(flooder.id).agent
        assert flood is not None
        for _ in range(600):  # the flooder holds the port within a minute: its noise arrives
            if flood.dropped:
                break
            await asyncio.sleep(0.1)
        t0, flooded = time.perf_counter(), list[float]()
        while flood.dropped <= MAX_NOISE_FRAMES and len(flooded) < cycles:
            flooded += await _exec_true(manager, vm.id, 1)
        for _ in range(600):  # the manager ends the flooder's channel past MAX_NOISE_FRAMES in a row
            if flood.dropped > MAX_NOISE_FRAMES:
                break
            await asyncio.sleep(0.1)
        flood_s = time.perf_counter() - t0
        await hostile.abandon()
        rows = [
            [name, len(xs), f"{median(xs):.1f}", f"{p95(xs):.1f}"]
            for name, xs in (
                ("sync round trip (the channel alone)", sync),
                ("exec `true`, round trip", exec_true),
                ("`true` spawned inside the guest (posix_spawn)", spawn),
                ("exec `true` while another VM floods its channel, until it ends", flooded),
            )
        ]
        return "\n".join([
            table(["guest agent (python-sandbox)", "n", "median ms", "p95 ms"], rows),
            aslr,
            f"the flood: {flood.dropped} frames for no call read and dropped in {flood_s:.1f} s, then the "
            "manager ended the flooder's channel",
            f"exec stdout, 100 MiB: {size / 2**20 / wall:.1f} MiB/s, {len(frames)} frames "
            f"(median {median([float(f) for f in frames]) / 1024:.0f} KiB); manager CPU {cpu:.2f} s "
            f"of {wall:.1f} s wall ({cpu / wall:.0%})",
            f"the same over TCP inside the VM's namespace (a guest process to the host): {tcp:.1f} MiB/s",
            f"files, 50 MiB: upload {files['agent_up']:.1f} against the app's {files['direct_up']:.1f} MiB/s "
            f"({files['agent_up'] / files['direct_up']:.2f}), download {files['agent_down']:.1f} against "
            f"{files['direct_down']:.1f} MiB/s ({files['agent_down'] / files['direct_down']:.2f})",
        ])  # fmt: skip
    finally:
        for rec in list(manager.list_vms()):
            await manager.delete(rec.id)
        await manager.close()
        shutil.rmtree(root, ignore_errors=True)


async def _tcp_ceiling(manager: VmManager, vm_id: str, size: int) -> float:
    """MiB/s of `size` bytes a guest process sends over TCP, read from inside the VM's namespace."""
    sender = await manager.exec(
        vm_id, ["python3", "-c", _GUEST_SEND.format(port=_TCP_PORT, mib=size >> 20)], [], "/", 0, 0
    )
    async for event in sender:
        if event.kind == "stdout" and b"listening" in event.data:
            break
    t0, got = time.perf_counter(), 0
    reader, writer = await asyncio.open_connection(sock=await netns.connect_guest(vm_id, _TCP_PORT, 30.0))
    try:
        async with asyncio.timeout(300):
            while chunk := await reader.read(1 << 20):
                got += len(chunk)
    finally:
        writer.close()
        await sender.abandon()
    assert got == size
    return size / 2**20 / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=30)
    args = parser.parse_args()
    print(asyncio.run(run(max(5, min(args.cycles, 500)))))


if __name__ == "__main__":
    main()
