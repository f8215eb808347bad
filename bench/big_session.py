"""Big sessions (issue 17, `scale_bench --big`): a python-sandbox VM with 4 GiB of RAM holding 3 GiB of Python
data against the 512 MiB image holding 256 MiB, each through the edge on 127.0.0.1 like a client.

Per VM: its first suspend (RAM leaves the template's copy-on-write mapping: the stream, then its own RAM file),
a later suspend, restore -> first answer (GET / waking it, twice), the first request that touches every page
of its data after a restore against the same request warm, the disk its suspended files take, and the
free-space check's estimate (vmm.snapshots.Snapshots.room_needed) against what the VM's directory held before
the first suspend and the most it held during it (with clone_ram "reflink" the RAM file is allocated as the
guest writes it, before any suspend).
"""

from __future__ import annotations

import asyncio
import json
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from edge import app
from vmm import probe, template
from vmm.image import load_image

from .stats import table

BIG_IMAGE = "python-sandbox-big"
SMALL = ("sandbox", "python-sandbox", 256)  # template, image, MiB of data it holds
SAMPLE_S = 0.05  # how often the VM's directory is measured during a suspend
FILL = """
import os
blocks = [(i.to_bytes(4, "little") + os.urandom(4092)) * 256 for i in range({mib})]
len(blocks)
"""
TOUCH = 'len(b"".join(block[::4096] for block in blocks))'  # one byte of every page: page faults, little CPU


def add_big_image(images: Path, memory_mb: int) -> None:
    """A state's `images` (a link to the built ones) made a directory of those plus BIG_IMAGE: python-sandbox
    at `memory_mb`, what `mvm image build --memory-mb` makes of the same Dockerfile. Its files are linked (a
    second build of the root filesystem costs minutes and yields the same bytes); only its metadata differs."""
    built = images.resolve()
    images.unlink()
    images.mkdir()
    for image in built.iterdir():
        (images / image.name).symlink_to(image)
    (images / BIG_IMAGE).mkdir()
    source = built / "python-sandbox"
    for item in source.iterdir():
        if item.name != "image.json":
            (images / BIG_IMAGE / item.name).symlink_to(item)
    meta = json.loads((source / "image.json").read_text())
    meta.update(name=BIG_IMAGE, memory_mb=memory_mb)
    meta.setdefault("labels", {})["mvm.memory_mb"] = str(memory_mb)
    (images / BIG_IMAGE / "image.json").write_text(json.dumps(meta))


def _allocated(directory: Path) -> int:
    """Bytes the files of `directory` take on disk (read while a suspend renames and removes them)."""
    return sum(_allocated_file(p) for p in directory.rglob("*"))


def _allocated_file(path: Path) -> int:
    """Bytes `path` takes on disk; 0 for a link, a directory, or a file gone since it was listed."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return 0
    return st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else 0


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


async def _timed(action: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = await action()
    return time.perf_counter() - start, result


class Session:
    """One python-sandbox VM reached through the edge with its token."""

    def __init__(self, edge: app.Edge, http: aiohttp.ClientSession, vm_id: str) -> None:
        self.edge, self.http, self.vm_id = edge, http, vm_id
        self.url = f"http://127.0.0.1:{edge.port}"
        token = edge.ctx.tokens.issue(vm_id)[0]
        self.headers = {"Host": f"{vm_id}.{edge.cfg.server.domain}", "Authorization": f"Bearer {token}"}

    async def get(self) -> None:
        async with self.http.get(self.url + "/", headers=self.headers) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"GET / on {self.vm_id}: {resp.status}")

    async def run(self, code: str) -> Any:
        async with self.http.post(self.url + "/run", json={"code": code}, headers=self.headers) as resp:
            answer = json.loads(await resp.read())
        if resp.status != 200 or answer["error"] is not None:
            raise RuntimeError(f"/run on {self.vm_id}: {resp.status} {answer}")
        return answer["result"]


async def _peak_during(directory: Path, action: Callable[[], Awaitable[Any]]) -> tuple[float, int, int]:
    """Seconds `action` took, what `directory` held before (allocated bytes) and the most it held meanwhile."""
    before = peak = _allocated(directory)
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _allocated(directory))
            await asyncio.sleep(SAMPLE_S)

    sampler = asyncio.create_task(sample())
    try:
        took, _ = await _timed(action)
    finally:
        done.set()
        await sampler
    return took, before, max(peak, _allocated(directory))


async def _measure(edge: app.Edge, http: aiohttp.ClientSession, tpl_name: str, image: str, mib: int) -> list[str]:
    manager = edge.manager
    if not (manager.settings.templates_dir / tpl_name).exists():
        await manager.create_template(tpl_name, image, lambda _: None)
    tpl = template.load(manager.settings, tpl_name)
    rec = await manager.create_vm(tpl_name)
    try:
        await probe.wait_ready(rec.id, load_image(manager.settings.images_dir, image).ready, 120.0, lambda: True)
        vm, vm_dir = Session(edge, http, rec.id), manager.vm_dir(rec.id)
        fill_s, _ = await _timed(lambda: vm.run(FILL.format(mib=mib)))
        warm_s, _ = await _timed(lambda: vm.run(TOUCH))
        estimate = manager.snapshots.room_needed(manager.records.get(rec.id), tpl)
        first_s, before, peak = await _peak_during(vm_dir, lambda: manager.suspend(rec.id))
        disk = _allocated(vm_dir)
        wake_1, _ = await _timed(vm.get)
        touch_s, _ = await _timed(lambda: vm.run(TOUCH))
        later_s, _ = await _timed(lambda: manager.suspend(rec.id))
        wake_2, _ = await _timed(vm.get)
    finally:
        await manager.delete(rec.id)
    return [
        f"{tpl.memory_mb} MiB, {mib} MiB of data (filled in {fill_s:.1f} s)",
        f"first {first_s:.2f} s, later {later_s:.2f} s",
        f"{wake_1 * 1000:.0f} / {wake_2 * 1000:.0f} ms",
        f"{touch_s:.2f} s (warm {warm_s:.2f} s)",
        _gib(disk),
        f"{_gib(estimate)} / {_gib(before)} -> {_gib(peak)}",
    ]


async def big_sessions(edge: app.Edge, big_mb: int) -> str:
    """The table: the small VM's row, then the big one's (3/4 of its memory in data)."""
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        rows = [
            await _measure(edge, http, *SMALL),
            await _measure(edge, http, "big", BIG_IMAGE, big_mb * 3 // 4),
        ]
    return table(
        ["python-sandbox VM", "suspend", "restore -> first answer (GET /, two wakes)",
         "first request touching every data page after a restore", "disk, suspended",
         "free-space estimate / the VM's dir before -> the most it held (first suspend)"],
        rows,
    )  # fmt: skip
