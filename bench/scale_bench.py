"""Scale benchmark (issue 17): many VMs on one machine, on a real edge on 127.0.0.1.

Sections, each bounded in count and time, in one scratch state directory removed at the end:
- density: idle python-sandbox clones until `--max` or until the machine's available memory falls
  under a floor; each must answer. Host memory per VM (QEMU PSS) and the kernel's own share per VM.
- suspended: `--suspended` demo VMs created and suspended one after another (2,000 in the full run),
  the control API probed meanwhile; then every page of GET /v1/vms, the registry read, the catalog
  query over a copy of the registry; kernel memory, disk and namespaces per suspended VM.
- wakes: `--wakes` suspended demo VMs, `--requests` requests each, all released by one barrier:
  every answer, p50/p99 wake-to-first-byte, restores per second, CPU-seconds per wake (QEMU, this
  process and its children), and the last answer against the CPU bound (N x CPU per wake / cores).
- creates: clones to first answer, `--creates` in a row and `--at-once` at the same time.
- big (`--big 4096`): a python-sandbox VM of that size holding 3/4 of it in Python data against the
  512 MiB one: suspends, restore -> first answer, the first request touching all its data, disk, and
  the free-space check's estimate (bench/big_session.py).
- wake cost (`--wake-cost N`): N demo and N python-sandbox VMs woken one after another, each wake's
  wall time and CPU (manager, QEMU) split into its steps (bench/wake_cost.py).
- disk: a python-sandbox VM that ran `x = 41`, suspended: its disk in the default mode ("cow", the
  state directory's filesystem) and with vmm.clone_ram = "reflink" on a loop-mounted XFS it makes.

Numbers from a shared machine are noisy: the lead re-measures on a quiet one.
Usage: .venv/bin/python -m bench.scale_bench [--max 150] [--suspended 2000 --clone-ram reflink] [--wakes 50]
       [--creates 100] [--big 4096] [--wake-cost 10]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import aiohttp

from edge import app
from fleet.catalog import open_catalog
from microvm_edge import AsyncClient
from mvm.config import Config, load_config
from vmm import probe
from vmm.errors import VmmError
from vmm.image import load_image
from vmm.manager import VmManager
from vmm.model import VmRecord, VmState
from vmm.network import netns
from vmm.registry import Registry

from .big_session import add_big_image, big_sessions
from .proc_cpu import cpu_seconds, own_cpu_seconds
from .stats import median, p99, table
from .tools import state_dir
from .wake_cost import wake_cost

BOOT_TIMEOUT = 300.0  # a template's boot on a machine busy with other work (the default 90 s is for one that is not)
MEMORY_FLOOR_MIB = 2048  # density stops before the machine's available memory falls under this
DISK_FLOOR = 5 << 30  # the suspended section stops before free disk falls under this
XFS_BYTES = 64 << 30  # the loop-mounted XFS file (sparse: only what is written takes space)
KERNEL_FIELDS = ("Slab:", "KernelStack:", "PageTables:", "SecPageTables:")
CLK_TCK = os.sysconf("SC_CLK_TCK")
SANDBOX = "python-sandbox"
PEERS = 2  # running clones beside the measured one: PSS shows what they share


def _meminfo(field: str) -> int:
    """A /proc/meminfo figure in KiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _kernel_kib() -> int:
    return sum(_meminfo(f) for f in KERNEL_FIELDS)


def _pss_kib(pid: int | None) -> int:
    if pid is None:
        return 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def _qemu_cpu(pid: int | None) -> float:
    return cpu_seconds(pid, children=False) if pid is not None else 0.0


def _machine_busy() -> float:
    """CPU-seconds the machine's cores have run anything since boot (/proc/stat: user, nice, system, irq,
    softirq; not idle, iowait, or the steal of a hypervisor under this machine)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:3]) + fields[5] + fields[6]) / CLK_TCK


def _allocated(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.rglob("*") if p.is_file() and not p.is_symlink())


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


async def _timed(action: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await action()
    return time.perf_counter() - start


def _config(state: Path, max_restores: int, clone_ram: str) -> Config:
    """The built-in defaults on an ephemeral 127.0.0.1 port over plain HTTP, a scratch state directory."""
    cfg = load_config(None)
    return replace(
        cfg,
        server=replace(cfg.server, listen_host="127.0.0.1", listen_port=0, tls=False, list_page_size=500),
        proxy=replace(cfg.proxy, wake_timeout=120.0, max_held_per_vm=64),
        vmm=replace(cfg.vmm, state_dir=state, max_concurrent_restores=max_restores, memory_reserve_mb=1024,
                    clone_ram=clone_ram, boot_timeout=BOOT_TIMEOUT),
        log=replace(cfg.log, level="warning"),
    )


class Bench:
    """One edge (manager, control API, proxy) and the VMs each section makes and deletes."""

    def __init__(self, edge: app.Edge) -> None:
        self.edge = edge
        self.manager: VmManager = edge.manager
        self.url = f"http://127.0.0.1:{edge.port}"
        self.domain = edge.cfg.server.domain

    async def delete_all(self) -> None:
        for rec in list(self.manager.list_vms()):
            await self.manager.delete(rec.id)

    async def ready(self, vm_id: str, template_image: str) -> None:
        ready = load_image(self.manager.settings.images_dir, template_image).ready
        await probe.wait_ready(vm_id, ready, 120.0, lambda: True)

    # ---- density ----------------------------------------------------------------------

    async def density(self, most: int) -> str:
        kernel_before, made = _kernel_kib(), []
        stopped = f"--max {most}"
        for _ in range(most):
            if _meminfo("MemAvailable:") < MEMORY_FLOOR_MIB * 1024:
                stopped = f"available memory under {MEMORY_FLOOR_MIB} MiB"
                break
            rec = await self.manager.create_vm("sandbox")
            await self.ready(rec.id, SANDBOX)
            made.append(rec)
        await asyncio.sleep(2.0)  # idle: the guests settle
        answered = 0
        for rec in made:
            try:
                await self.ready(rec.id, SANDBOX)
                answered += 1
            except VmmError:  # counted as not answering
                pass
        n = len(made)
        pss = [_pss_kib(r.pid) for r in made]
        kernel = (_kernel_kib() - kernel_before) / max(n, 1)
        await self.delete_all()
        return table(
            ["density (idle python-sandbox clones)", "value"],
            [
                ["VMs running (largest N here)", f"{n} (stopped by {stopped})"],
                ["answering", f"{answered}/{n}"],
                ["host memory per VM, QEMU PSS (median)", f"{median(pss) / 1024:.1f} MiB" if pss else "-"],
                ["kernel's own share per VM (slab, stacks, page tables)", f"{kernel / 1024:.1f} MiB"],
                ["projected N on this machine's memory", f"{_projected(pss, kernel)}"],
            ],
        )

    # ---- many suspended VMs ----------------------------------------------------------

    async def suspended(self, count: int) -> str:
        kernel_before, vms_dir = _kernel_kib(), self.manager.settings.vms_dir
        reflinked = self.manager.settings.clone_ram == "reflink"  # then the state dir is this bench's own XFS
        disk_before = _fs_used(vms_dir) if reflinked else _allocated(vms_dir)
        probes: list[float] = []
        stop = asyncio.Event()

        async def probe_api() -> None:  # the server stays responsive: a small list page every 0.2 s
            async with AsyncClient(self.url, self.edge.cfg.server.admin_key) as client:
                while not stop.is_set():
                    probes.append(await _timed(lambda: client.list_page(limit=1)))
                    await asyncio.sleep(0.2)

        prober = asyncio.create_task(probe_api())
        started = time.perf_counter()
        ids: list[str] = []
        stopped = ""
        try:
            for _ in range(count):
                if min(shutil.disk_usage(vms_dir).free, shutil.disk_usage("/tmp").free) < DISK_FLOOR:
                    stopped = f" (stopped: under {DISK_FLOOR >> 30} GiB of disk free)"
                    break
                rec = await self.manager.create_vm("demo")
                await self.manager.suspend(rec.id)
                ids.append(rec.id)
        finally:
            stop.set()
            await prober
        made_in = time.perf_counter() - started
        async with AsyncClient(self.url, self.edge.cfg.server.admin_key) as client:
            t0 = time.perf_counter()
            pages, cursor, listed = 0, None, 0
            while True:
                page, cursor = await client.list_page(limit=500, cursor=cursor)
                pages, listed = pages + 1, listed + len(page)
                if cursor is None:
                    break
            list_s = time.perf_counter() - t0
        registry_s, catalog_s = await _queries(self.manager.settings.registry_path)
        with_ns = len(set(netns.list_project_namespaces()) & {netns.ns_name(i) for i in ids})
        count = len(ids)
        kernel = (_kernel_kib() - kernel_before) / max(count, 1)
        disk = ((_fs_used(vms_dir) if reflinked else _allocated(vms_dir)) - disk_before) / max(count, 1)
        await self.delete_all()
        mode = self.manager.settings.clone_ram
        return table(
            [f"{count} demo VMs created and suspended{stopped}", "value"],
            [
                ["create + suspend, one after another", f"{made_in:.1f} s ({count / made_in:.1f} VMs/s)"],
                ["control API meanwhile: GET /v1/vms?limit=1 p50 / max",
                 f"{median(probes) * 1000:.1f} / {max(probes) * 1000:.1f} ms ({len(probes)} probes)"],
                ["every page of GET /v1/vms (limit 500) via the SDK", f"{list_s * 1000:.0f} ms, {pages} pages, "
                 f"{listed} VMs"],
                ["registry: load every record", f"{registry_s * 1000:.1f} ms"],
                ["catalog (sqlite, a copy): suspended VMs by state", f"{catalog_s * 1000:.1f} ms"],
                ["namespaces held by suspended VMs", str(with_ns)],
                ["kernel memory per suspended VM", f"{kernel:.1f} KiB"],
                [f"disk per suspended VM (demo, clone_ram {mode})", _mib(disk)],
            ],
        )  # fmt: skip

    # ---- many wakes at once -------------------------------------------------------------

    async def wakes(self, count: int, requests: int) -> str:
        ids: list[str] = []
        for _ in range(count):
            rec = await self.manager.create_vm("demo")
            await self.ready(rec.id, "demo")
            await self.manager.suspend(rec.id)
            ids.append(rec.id)
        tokens = {vm_id: self.edge.ctx.tokens.issue(vm_id)[0] for vm_id in ids}
        running_at: dict[str, float] = {}

        def seen(rec: VmRecord) -> None:
            if rec.state is VmState.RUNNING and rec.id in tokens and rec.id not in running_at:
                running_at[rec.id] = time.perf_counter()

        self.manager.listeners.append(seen)
        barrier = asyncio.Event()
        at_answer: dict[str, float] = {}  # each QEMU's CPU when its VM's first answer came
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

            async def one(vm_id: str) -> tuple[int, float]:
                headers = {"Host": f"{vm_id}.{self.domain}", "Authorization": f"Bearer {tokens[vm_id]}"}
                await barrier.wait()
                t0 = time.perf_counter()
                async with session.get(self.url + "/", headers=headers) as resp:
                    first_byte = time.perf_counter() - t0
                    await resp.read()
                    # the wake's own cost, before the woken guest idles while the others wake
                    at_answer.setdefault(vm_id, _qemu_cpu(self.manager.get(vm_id).pid))
                    return resp.status, first_byte

            tasks = [asyncio.create_task(one(vm_id)) for vm_id in ids for _ in range(requests)]
            await asyncio.sleep(0.2)  # every request waits at the barrier
            cpu_before, busy_before = own_cpu_seconds(), _machine_busy()
            released = time.perf_counter()
            barrier.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            last_answer = time.perf_counter() - released
            machine_busy = _machine_busy() - busy_before
        self.manager.listeners.remove(seen)
        qemu_cpu = sum(_qemu_cpu(self.manager.get(v).pid) for v in ids)
        cpu = qemu_cpu + own_cpu_seconds() - cpu_before
        ok = [r for r in results if isinstance(r, tuple) and r[0] == 200]
        waits = [r[1] for r in ok]
        restored = max(running_at.values(), default=released) - released
        per_wake = cpu / count
        bound = count * per_wake / (os.cpu_count() or 1)
        got = cpu / max(machine_busy, cpu)  # the part of the machine's busy CPU that was this run's
        await self.delete_all()
        return table(
            [f"{count} suspended demo VMs x {requests} requests, one barrier", "value"],
            [
                ["answered", f"{len(ok)}/{len(results)}"],
                ["wake-to-first-byte p50 / p99 / max",
                 f"{median(waits):.2f} / {p99(waits):.2f} / {max(waits):.2f} s" if waits else "-"],
                ["restores per second", f"{len(running_at) / restored:.1f}" if restored > 0 else "-"],
                ["CPU-seconds per wake (QEMU + edge/manager + children)",
                 f"{per_wake:.2f} (QEMU {qemu_cpu / count:.2f})"],
                ["QEMU CPU-seconds per wake at its first answer (median)",
                 f"{median(list(at_answer.values())):.2f}" if at_answer else "-"],
                ["this run's part of the machine's busy CPU meanwhile (the rest: other work)",
                 f"{got:.0%} of {machine_busy:.1f} CPU-s"],
                ["last answer / CPU bound (N x CPU per wake / cores)",
                 f"{last_answer:.1f} s / {bound:.1f} s = {last_answer / bound:.2f}x (goal <= 1.3x)"],
                ["vmm.max_concurrent_restores", str(self.manager.restores.bound)],
            ],
        )  # fmt: skip

    # ---- creates per second ----------------------------------------------------------

    async def creates(self, in_a_row: int, at_once: int) -> str:
        async def create() -> float:
            t0 = time.perf_counter()
            rec = await self.manager.create_vm("demo")
            await self.ready(rec.id, "demo")
            return time.perf_counter() - t0

        t0 = time.perf_counter()
        row = [await create() for _ in range(in_a_row)]
        row_s = time.perf_counter() - t0
        await self.delete_all()
        t0 = time.perf_counter()
        together = await asyncio.gather(*(create() for _ in range(at_once)))
        together_s = time.perf_counter() - t0
        await self.delete_all()
        return table(
            ["creates (demo clone -> first answer)", "VMs/s", "median s", "max s"],
            [
                [f"{in_a_row} in a row", f"{in_a_row / row_s:.1f}", f"{median(row):.2f}", f"{max(row):.2f}"],
                [f"{at_once} at once", f"{at_once / together_s:.1f}", f"{median(together):.2f}",
                 f"{max(together):.2f}"],
            ],
        )  # fmt: skip


def _projected(pss_kib: list[int], kernel_kib: float) -> str:
    if not pss_kib:
        return "-"
    per_vm = median(pss_kib) + kernel_kib
    total = _meminfo("MemTotal:") - 1024 * 1024  # 1 GiB for the host itself
    return f"{int(total / per_vm)} at {per_vm / 1024:.0f} MiB per VM"


async def _queries(registry: Path) -> tuple[float, float]:
    """Seconds to load every registry record, and to list suspended VMs from a catalog made of a copy."""
    t0 = time.perf_counter()
    reg = Registry(registry)
    reg.load_all()
    reg.close()
    registry_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="mvmb-catalog-") as tmp:
        copy = Path(tmp) / "catalog.sqlite3"
        src, dst = sqlite3.connect(registry), sqlite3.connect(copy)
        src.backup(dst)
        src.close()
        dst.close()
        catalog = await open_catalog(None, copy)
        try:
            t0 = time.perf_counter()
            await catalog.list_vms(states=[VmState.SUSPENDED])
            catalog_s = time.perf_counter() - t0
        finally:
            await catalog.close()
    return registry_s, catalog_s


async def _disk_per_suspended(manager: VmManager, reflinked: VmManager | None) -> str:
    """A python-sandbox VM that ran `x = 41`, suspended: its files in each mode. The default mode's files share
    no block, so their allocated size is what they cost; a reflinked file's is what its (own) filesystem grew."""
    rows = []
    for mode, mgr in (("cow (state dir as is)", manager), ("reflink (loop XFS)", reflinked)):
        if mgr is None:
            rows.append([mode, "-", "-", "-", "not measured (no mkfs.xfs or loop device)", "-"])
            continue
        state = mgr.settings.state_dir
        before = _fs_used(state) if mgr is reflinked else 0
        ready = load_image(mgr.settings.images_dir, SANDBOX).ready
        peers = [await mgr.create_vm("sandbox") for _ in range(PEERS)]
        rec = await mgr.create_vm("sandbox")
        for vm in (*peers, rec):
            await probe.wait_ready(vm.id, ready, 120.0, lambda: True)
        pss = median([_pss_kib(vm.pid) for vm in (*peers, rec)]) / 1024  # what sharing the template saves shows
        for vm in peers:
            await mgr.delete(vm.id)
        run = await mgr.exec(rec.id, ["python3", "-c", "x = 41"], [], "/", 0, 0)
        async for _ in run:
            pass
        first = await _timed(functools.partial(mgr.suspend, rec.id))
        await mgr.ensure_running(rec.id)
        later = await _timed(functools.partial(mgr.suspend, rec.id))
        vm_dir = mgr.vm_dir(rec.id)
        ram = _changed_pages(vm_dir / "ram", Path(mgr.settings.templates_dir / "sandbox" / "ram"))
        device = (vm_dir / "state").stat().st_size
        used = _fs_used(state) - before if mgr is reflinked else _allocated(vm_dir)
        rows.append([mode, _mib(used), _mib(ram), f"{used / (ram + device):.2f}x",
                     f"first {first * 1000:.0f} ms, later {later * 1000:.0f} ms", f"{pss:.1f} MiB"])  # fmt: skip
        await mgr.delete(rec.id)
    return table(
        ["disk per suspended python-sandbox (ran x = 41)", "disk used", "pages changed", "ratio (goal 1.5x)",
         "suspend", f"running: QEMU PSS, {PEERS + 1} clones"],
        rows,
    )  # fmt: skip


def _fs_used(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _changed_pages(ram: Path, template_ram: Path, page: int = 4096) -> int:
    changed = 0
    with open(ram, "rb") as a, open(template_ram, "rb") as b:
        while block := a.read(1 << 20):
            theirs = b.read(len(block))
            changed += sum(page for i in range(0, len(block), page) if block[i : i + page] != theirs[i : i + page])
    return changed


class LoopXfs:
    """A sparse file formatted XFS (reflink=1) and loop-mounted under `root`; removed by `close`."""

    def __init__(self, root: Path, size: int) -> None:
        self.image, self.mount = root / "xfs.img", root / "xfs"
        with open(self.image, "wb") as f:
            f.truncate(size)
        subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(self.image)], check=True)
        self.mount.mkdir()
        subprocess.run(["mount", "-o", "loop", str(self.image), str(self.mount)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", str(self.mount)], check=False)
        self.mount.rmdir()
        self.image.unlink(missing_ok=True)


async def run(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="mvmb-scale-", dir="/tmp"))
    xfs = LoopXfs(root, XFS_BYTES) if args.clone_ram == "reflink" else None
    other: tuple[VmManager, LoopXfs | None] | None = None
    try:
        state = state_dir((xfs.mount if xfs is not None else root) / "state")
        if args.big:
            add_big_image(state / "images", args.big)
        edge = await app.start(_config(state, args.max_restores, args.clone_ram))  # boots the default template
        bench = Bench(edge)
        try:
            print(f"accelerator {edge.manager.accel.name}, {os.cpu_count()} cores, "
                  f"{_meminfo('MemTotal:') // 1024} MiB, clone_ram {args.clone_ram}; other work may run beside this",
                  flush=True)  # fmt: skip
            if args.max or args.disk:
                await edge.manager.create_template("sandbox", SANDBOX, lambda _: None)
            if args.big:
                print(await big_sessions(edge, args.big), end="\n\n", flush=True)
            if args.wake_cost:
                if not (edge.manager.settings.templates_dir / "sandbox").exists():
                    await edge.manager.create_template("sandbox", SANDBOX, lambda _: None)
                for tpl, image in (("demo", "demo"), ("sandbox", SANDBOX)):
                    print(await wake_cost(edge.manager, tpl, image, args.wake_cost), end="\n\n", flush=True)
            if args.wakes:
                print(await bench.wakes(args.wakes, args.requests), end="\n\n", flush=True)
            if args.creates:
                print(await bench.creates(args.creates, args.at_once), end="\n\n", flush=True)
            if args.suspended:
                print(await bench.suspended(args.suspended), end="\n\n", flush=True)
            if args.max:
                print(await bench.density(args.max), end="\n\n", flush=True)
            if args.disk:
                other = await _other_mode(root, edge.manager, "reflink" if args.clone_ram == "cow" else "cow")
                cow, reflinked = (edge.manager, other[0]) if args.clone_ram == "cow" else (other[0], edge.manager)
                print(await _disk_per_suspended(cow, reflinked if reflinked.settings.clone_ram == "reflink" else None),
                      flush=True)  # fmt: skip
        finally:
            await bench.delete_all()
            await app.stop(edge)
    finally:
        if other is not None:
            for rec in list(other[0].list_vms()):
                await other[0].delete(rec.id)
            await other[0].close()
            if other[1] is not None:
                other[1].close()
        if xfs is not None:
            xfs.close()
        shutil.rmtree(root, ignore_errors=True)


async def _other_mode(root: Path, manager: VmManager, mode: str) -> tuple[VmManager, LoopXfs | None]:
    """A second manager in the other clone_ram mode, with a copy of the sandbox template: "reflink" on a loop
    XFS it makes (a manager in "cow" mode if mkfs.xfs is missing: its row then says so), "cow" under `root`."""
    xfs = LoopXfs(root, XFS_BYTES) if mode == "reflink" and shutil.which("mkfs.xfs") else None
    if mode == "reflink" and xfs is None:
        mode = "cow"
    state = state_dir((xfs.mount if xfs is not None else root / "other") / "state")
    (state / "templates").mkdir()
    src = manager.settings.templates_dir / "sandbox"
    subprocess.run(["cp", "-a", "--sparse=always", str(src), str(state / "templates")], check=True)
    other = VmManager(replace(manager.settings, state_dir=state, clone_ram=mode))
    await other.start()
    return other, xfs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max", type=int, default=5, help="density: most python-sandbox VMs to run (full: 150+)")
    parser.add_argument("--suspended", type=int, default=20, help="VMs to create and suspend (full: 2000)")
    parser.add_argument("--wakes", type=int, default=10, help="suspended VMs woken at once (full: 50)")
    parser.add_argument("--requests", type=int, default=4, help="requests per woken VM")
    parser.add_argument("--creates", type=int, default=10, help="creates in a row (full: 100)")
    parser.add_argument("--at-once", type=int, default=5, help="creates at the same time (full: 20)")
    parser.add_argument("--big", type=int, default=0, metavar="MIB",
                        help="big sessions: a python-sandbox VM of MIB MiB (full: 4096) holding 3/4 of it in data, "
                             "against the 512 MiB one; 0: off")
    parser.add_argument("--wake-cost", type=int, default=0, metavar="N",
                        help="where one wake's CPU goes: N demo and N python-sandbox VMs woken one after another")
    parser.add_argument("--max-restores", type=int, default=0, help="vmm.max_concurrent_restores (0: one per core)")
    parser.add_argument("--clone-ram", choices=("cow", "reflink"), default="cow",
                        help="vmm.clone_ram; reflink puts the state directory on a loop-mounted XFS (the full "
                             "--suspended 2000 needs it: in cow mode a suspended demo VM takes about 112 MiB)")
    parser.add_argument("--disk", action=argparse.BooleanOptionalAction, default=True,
                        help="disk per suspended VM, cow and reflink (loop XFS)")  # fmt: skip
    args = parser.parse_args()
    for name, most in (("max", 400), ("suspended", 5000), ("wakes", 200), ("requests", 16), ("creates", 500),
                       ("at_once", 100), ("big", 32768), ("wake_cost", 100)):  # fmt: skip
        setattr(args, name, max(0, min(getattr(args, name), most)))
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
