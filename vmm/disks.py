"""Root disks: sparse copies, per-VM copy-on-write overlays (qcow2 over the template's raw base)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from .buildtools import tool
from .errors import VmmError


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise VmmError(f"{Path(argv[0]).name} failed (exit {proc.returncode}): {err.decode(errors='replace').strip()}")


async def sparse_copy(source: Path, target: Path) -> None:
    """Copy a disk image keeping its holes: only written blocks take space."""
    await _run(tool("cp"), "--sparse=always", str(source), str(target))


async def create_overlay(base: Path, overlay: Path) -> None:
    """A qcow2 that reads through to `base` and keeps its own writes; same virtual size as the base.

    The size cannot differ: the guest's filesystem in the snapshot was made for the base's size.
    """
    await _run(tool("qemu-img"), "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base.resolve()), str(overlay))


async def rebase_overlay(overlay: Path, base: Path) -> None:
    """Point an overlay that came from another host at this host's copy of the same base (no data copied)."""
    backing = str(base.resolve())
    await _run(tool("qemu-img"), "rebase", "-u", "-q", "-f", "qcow2", "-F", "raw", "-b", backing, str(overlay))


def allocated_bytes(path: Path) -> int:
    """Bytes the file really takes on the host (sparse holes not counted)."""
    return path.stat().st_blocks * 512
