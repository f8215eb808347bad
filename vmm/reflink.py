"""Reflinked copies of a template's RAM file (vmm.clone_ram = "reflink"): a VM's own RAM file that shares
every block with the template until the guest writes to it, so it costs disk only for the pages it changes.

A guest also writes pages without changing them (a kernel zeroing a page that was zero, data written
back as it was): each such write gives the page a block of its own. `compact`, at every suspend,
finds the blocks of the VM's file that are its own (FIEMAP), shares those equal to the template's
again (FIDEDUPERANGE, which compares them in the kernel) and makes zero pages holes.

The copy is one ioctl (FICLONE) and needs a filesystem with reflinks (XFS made with reflink=1, the
default of current mkfs.xfs; btrfs) holding both files. XFS gives each write to a shared block a
copy-on-write extent of 32 blocks by default (128 KiB for a 4 KiB page): the clone's hint is set
to one block, so a page the guest changes takes a page of disk, not 32.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
import tempfile
from pathlib import Path

from .errors import VmmError

FICLONE = 0x40049409
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_COWEXTSIZE = 0x00010000
_FSXATTR = struct.Struct("IIIII8x")  # xflags, extsize, nextents, projid, cowextsize
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_SHARED = 0x2000
FIDEDUPERANGE = 0xC0189436
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x1, 0x2
PAGE = 4096
CHUNK = 1 << 20  # bytes compared at a time
_FIEMAP = struct.Struct("QQIIII")  # start, length, flags, mapped extents, extent count, reserved
_EXTENT = struct.Struct("QQQQQIIII")  # logical, physical, length, 2 reserved, flags, 3 reserved
_DEDUPE = struct.Struct("QQHHI")  # source offset, length, destination count, 2 reserved
_DEDUPE_INFO = struct.Struct("qQQiI")  # destination fd, destination offset, bytes deduped, status, reserved
_ZERO = bytes(PAGE)
_libc = ctypes.CDLL(None, use_errno=True)
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV, errno.ENOSYS)


def clone(source: Path, target: Path) -> None:
    """`target` as a new file sharing every block of `source` (no data copied); VmmError if it cannot be."""
    with open(source, "rb") as src:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(fd, FICLONE, src.fileno())
            _small_cow_extents(fd)
        except OSError as exc:
            os.close(fd)
            target.unlink(missing_ok=True)
            why = "its filesystem has no reflinks" if exc.errno in _NOT_SUPPORTED else exc.strerror
            raise VmmError(f"cannot reflink {source} to {target}: {why} (vmm.clone_ram = \"reflink\")") from exc
        os.close(fd)


def supported(directory: Path) -> bool:
    """Whether files in `directory` can be reflinked (a one-block probe, removed again)."""
    with tempfile.TemporaryDirectory(prefix=".reflink-probe-", dir=directory) as tmp:
        source = Path(tmp) / "a"
        source.write_bytes(b"\0" * 4096)
        try:
            clone(source, Path(tmp) / "b")
        except VmmError:
            return False
    return True


def _small_cow_extents(fd: int) -> None:
    """XFS: the copy-on-write extent hint of the file is one block (other filesystems have no such hint)."""
    with contextlib.suppress(OSError):
        raw = bytearray(_FSXATTR.size)
        fcntl.ioctl(fd, FS_IOC_FSGETXATTR, raw)
        xflags, extsize, nextents, projid, _ = _FSXATTR.unpack(bytes(raw))
        block = os.fstatvfs(fd).f_bsize
        hint = _FSXATTR.pack(xflags | FS_XFLAG_COWEXTSIZE, extsize, nextents, projid, block)
        fcntl.ioctl(fd, FS_IOC_FSSETXATTR, hint)


def compact(ram: Path, template_ram: Path) -> int:
    """Give back the blocks of a suspended VM's RAM file that hold what the template's do (shared again)
    or zeros (holes); the file reads the same. Returns the bytes given back."""
    given = 0
    with open(ram, "r+b") as own, open(template_ram, "rb") as tpl:
        for start, length in _own_extents(own.fileno()):
            end = min(start + length, os.fstat(own.fileno()).st_size)
            for offset in range(start, end, CHUNK):
                size = min(CHUNK, end - offset)
                given += _compact_chunk(own.fileno(), tpl.fileno(), offset, os.pread(own.fileno(), size, offset),
                                        os.pread(tpl.fileno(), size, offset))  # fmt: skip
    return given


def _compact_chunk(own: int, tpl: int, offset: int, mine: bytes, theirs: bytes) -> int:
    """Runs of zero pages punched out, runs of pages equal to the template's deduplicated; bytes given back."""
    given, run_kind, run_start = 0, "", 0
    pages = [(i, _kind(mine[i : i + PAGE], theirs[i : i + PAGE])) for i in range(0, len(mine) - PAGE + 1, PAGE)]
    for i, kind in [*pages, (len(mine), "end")]:
        if kind == run_kind:
            continue
        if run_kind == "zero":
            given += _punch(own, offset + run_start, i - run_start)
        elif run_kind == "same":
            given += _dedupe(tpl, own, offset + run_start, i - run_start)
        run_kind, run_start = kind, i
    return given


def _kind(mine: bytes, theirs: bytes) -> str:
    if mine == _ZERO:
        return "zero"
    return "same" if mine == theirs else "changed"


def _own_extents(fd: int) -> list[tuple[int, int]]:
    """(offset, length) of the written extents of the file that share no block with another file."""
    found: list[tuple[int, int]] = []
    start, count = 0, 256
    while True:
        request = bytearray(_FIEMAP.pack(start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0, count, 0))
        request += bytes(_EXTENT.size * count)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, request)
        mapped = _FIEMAP.unpack_from(request)[3]
        if mapped == 0:
            return found
        for n in range(mapped):
            logical, _, length, _, _, flags, *_ = _EXTENT.unpack_from(request, _FIEMAP.size + n * _EXTENT.size)
            if not flags & (FIEMAP_EXTENT_SHARED | FIEMAP_EXTENT_UNWRITTEN):
                found.append((logical, length))
            if flags & FIEMAP_EXTENT_LAST:
                return found
        start = logical + length


def _punch(fd: int, offset: int, length: int) -> int:
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")
    return length


def _dedupe(source: int, dest: int, offset: int, length: int) -> int:
    """Share [offset, offset+length) of `dest` with the same range of `source` if the kernel finds them equal."""
    request = bytearray(_DEDUPE.pack(offset, length, 1, 0, 0) + _DEDUPE_INFO.pack(dest, offset, 0, 0, 0))
    fcntl.ioctl(source, FIDEDUPERANGE, request)
    _, _, deduped, status, _ = _DEDUPE_INFO.unpack_from(request, _DEDUPE.size)
    if status < 0:
        raise OSError(-status, f"FIDEDUPERANGE: {os.strerror(-status)}")
    return int(deduped) if status == 0 else 0
