"""Checksums of snapshot files, so a damaged snapshot is refused instead of loaded.

QEMU checks little of a migration stream: a flipped byte in a register or a page loads
silently and the guest runs on with wrong memory. Every snapshot file gets a sidecar
`<file>.sha256` written before the file takes its final name; a restore verifies it first.
Device state is small (tens of KiB), so it is always checked. A VM's own RAM file is as
large as its memory, so checking it is optional (`vmm.verify_ram`): only its data extents
are read, a sparse file's holes are skipped.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import VmmError

SUFFIX = ".sha256"
_CHUNK = 1 << 20


class SnapshotCorrupt(VmmError):
    """A snapshot file does not match the checksum written with it; nothing was loaded."""

    http_status = 503


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + SUFFIX)


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sparse_digest(path: Path) -> str:
    """sha256 over (offset, data) of every data extent: equal for equal contents, and fast on sparse files."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        h.update(size.to_bytes(8, "little"))
        offset = 0
        while offset < size:
            try:
                offset = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, offset, os.SEEK_HOLE)
            h.update(offset.to_bytes(8, "little"))
            while offset < end:
                block = os.pread(fd, min(_CHUNK, end - offset), offset)
                if not block:
                    break
                h.update(block)
                offset += len(block)
    finally:
        os.close(fd)
    return h.hexdigest()


def write(path: Path, digest: str) -> None:
    """Write `path`'s sidecar atomically (before `path` itself is renamed into place)."""
    target = sidecar(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(digest + "\n")
    tmp.rename(target)


def remove(path: Path) -> None:
    sidecar(path).unlink(missing_ok=True)


def verify(path: Path, sparse: bool = False) -> bool:
    """Raise SnapshotCorrupt if `path` does not match its sidecar; False if it has none (older snapshot)."""
    try:
        expected = sidecar(path).read_text().strip()
    except FileNotFoundError:
        return False
    try:
        actual = sparse_digest(path) if sparse else file_digest(path)
    except FileNotFoundError as exc:
        raise SnapshotCorrupt(f"snapshot file {path.name} is missing") from exc
    if actual != expected:
        raise SnapshotCorrupt(
            f"snapshot file {path.name} does not match its checksum (sha256 {actual[:12]}…, "
            f"written {expected[:12]}…): it was damaged after it was saved; the files are kept as they are"
        )
    return True
