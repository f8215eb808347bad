"""Root disks: sparse copies, per-VM copy-on-write overlays (qcow2 over the template's raw base), and the
qcow2 backing chains checkpoints and forks make (a VM's overlay over a checkpoint's frozen layer)."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import struct
from pathlib import Path

from .buildtools import tool
from .errors import VmmError
from .vm_files import CHECKPOINTS

_QCOW2_MAGIC = 0x514649FB
_QCOW2_HEAD = struct.Struct(">IIQI")  # magic, version, backing file offset, backing file name size
MAX_CHAIN_READ = 64


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


async def copy_extents(source: Path, target: Path) -> None:
    """A copy of a sparse file (a RAM file, a disk layer) made in the kernel: copy_file_range over its
    written extents, in a worker thread. On XFS with reflinks (or btrfs) the kernel shares the blocks
    instead (300 MB in 26 ms, no disk used); on ext4 it copies page cache to page cache without `cp`'s
    process and pass through user space (300 MB: 158 ms and 90 ms of CPU against 176 and 106, medians
    of 8 at load 6-10). Holes stay holes; written zero blocks stay written (cp --sparse=always made
    them holes: a checkpoint takes ~10% more disk).

    `source` is read only as the regular file its name holds, never through a symlink (nor blocked by
    a FIFO): a VM's directory is its QEMU's uid's, and a QEMU that broke out of its guest could plant
    one to have a root-only file copied into a checkpoint, which its children map as their RAM."""
    await asyncio.to_thread(_copy_extents, source, target)


def _copy_extents(source: Path, target: Path) -> None:
    src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(src).st_mode):
            raise VmmError(f"{source} is not a regular file: not copied")
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(src).st_size
            os.ftruncate(dst, size)
            for start, end in _data_extents(src, size):
                while start < end:
                    copied = os.copy_file_range(src, dst, end - start, start, start)
                    if copied == 0:
                        raise VmmError(f"copy of {source} ended early at byte {start} of {end}")
                    start += copied
        except BaseException:
            target.unlink(missing_ok=True)  # a copy cut short is no copy
            raise
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of each written run of the file (SEEK_DATA / SEEK_HOLE)."""
    found, offset = [], 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no data past `offset`
                raise
            break
        offset = os.lseek(fd, start, os.SEEK_HOLE)
        found.append((start, offset))
    return found


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


async def create_layer(backing: Path, overlay: Path) -> None:
    """A qcow2 over a qcow2 layer (a checkpoint's disk), naming it relative to `overlay`'s directory, so a
    VM directory that moves to another host (or is renamed) keeps its chain."""
    rel = os.path.relpath(backing.resolve(), overlay.parent.resolve())
    await _run(tool("qemu-img"), "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", rel, str(overlay))


async def copy_layer(source: Path, target: Path) -> None:
    """A sparse copy of a qcow2 overlay whose backing file stays the same file: a relative name (a layer
    of a checkpoint) is rewritten for the copy's directory; no data is touched."""
    await copy_extents(source, target)
    backing = backing_file(source)
    if backing is not None and backing.suffix == ".qcow2":
        rel = os.path.relpath(backing.resolve(), target.parent.resolve())
        await _run(tool("qemu-img"), "rebase", "-u", "-q", "-f", "qcow2", "-F", "qcow2", "-b", rel, str(target))


async def flatten_to_raw(image: Path, target: Path) -> None:
    """`image` and every layer under it as one sparse raw file (a template's base disk)."""
    await _run(tool("qemu-img"), "convert", "-q", "-O", "raw", "-S", "4k", str(image), str(target))


def backing_file(path: Path) -> Path | None:
    """The file a qcow2 image reads through to (from its header), absolute; None for a raw file or no backing."""
    with path.open("rb") as f:
        head = f.read(_QCOW2_HEAD.size)
        if len(head) < _QCOW2_HEAD.size:
            return None
        magic, _, offset, size = _QCOW2_HEAD.unpack(head)
        if magic != _QCOW2_MAGIC or not offset or not size:
            return None
        f.seek(offset)
        name = f.read(size).decode(errors="replace")
    return Path(os.path.normpath(path.parent / name))


def backing_chain(path: Path) -> list[Path]:
    """Every file under `path` (itself excluded), nearest first, bounded so a loop cannot hang."""
    chain: list[Path] = []
    current: Path | None = path
    while current is not None and len(chain) < MAX_CHAIN_READ:
        try:
            current = backing_file(current)
        except OSError:
            break
        if current is not None:
            chain.append(current)
    return chain


CHILDREN = "children"  # in a checkpoint's directory (root's): the VMs forked from it, one id a line


def admit_child(checkpoint_dir: Path, vm_id: str) -> None:
    """Record that `vm_id` may read through the checkpoint's disk layer (it is forked from it), before its
    QEMU first starts; written by root, where no VM's QEMU can write."""
    fd = os.open(checkpoint_dir / CHILDREN, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o444)
    try:
        os.write(fd, f"{vm_id}\n".encode())
    finally:
        os.close(fd)


def trusted_chain(image: Path, owner: str, base: Path | None, vms_dir: Path) -> list[Path]:
    """`image`'s backing chain (`image` is VM `owner`'s), refused unless every file under it is one the
    manager made for it: its template's `base` disk, or a checkpoint's disk layer (root's, sealed) of the
    VM whose file names it or of a VM it was forked from. The header naming each is written by a VM's
    QEMU, so one that escaped could otherwise name any host file for root's qemu-img to read, or for the
    next jail to bind."""
    chain = backing_chain(image)
    base_disk, vms = base.resolve() if base is not None else None, vms_dir.resolve()
    reader = owner  # the VM whose file names the next layer
    for layer in chain:
        real = layer.resolve()
        ckpt_dir = real.parent  # vms/<holder>/checkpoints/<name>/<layer>, for a checkpoint's layer
        holder = ckpt_dir.parent.parent.name
        in_checkpoints = ckpt_dir.parent.name == CHECKPOINTS and ckpt_dir.parent.parent.parent == vms
        is_layer = in_checkpoints and real.name == image.name
        readable = is_layer and (holder == reader or _forked_from(ckpt_dir, reader))
        try:
            info = os.stat(real, follow_symlinks=False)
        except OSError:
            info = None
        if not (readable or real == base_disk) or info is None or not stat.S_ISREG(info.st_mode) or info.st_uid != 0:
            raise VmmError(
                f"the disk {image.name} of VM {owner} reads through {layer}, which is neither its template's "
                f"base disk nor a layer of its own or its parent's checkpoints: refused (a QEMU writes the "
                f"header naming it)"
            )
        if is_layer:
            reader = holder
    return chain


def _forked_from(checkpoint_dir: Path, vm_id: str) -> bool:
    """Whether `vm_id` was forked from the checkpoint; a checkpoint captured before children were recorded
    (no such file) admits any."""
    try:
        with open(checkpoint_dir / CHILDREN, "rb") as f:
            return vm_id.encode() in f.read().split()
    except FileNotFoundError:
        return True
