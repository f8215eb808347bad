"""A VM's app log: what its app wrote to stdout and stderr, in a bounded file per VM.

QEMU appends the guest's console output to the file (O_APPEND). When it grows past its
bound, its content moves to `<file>.1` (replacing the older one) and the file is
truncated in place; QEMU's appends then continue at the new end. So a VM never holds more
than twice the bound on disk, and readers see the older file followed by the current one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

FOLLOW_POLL_SECONDS = 0.25


class AppLog:
    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.older = path.with_name(path.name + ".1")
        self.max_bytes = max_bytes

    def rotate_if_needed(self) -> bool:
        """Keep the file under its bound; True if it rotated."""
        try:
            if self.path.stat().st_size <= self.max_bytes:
                return False
        except FileNotFoundError:
            return False
        tmp = self.older.with_name(self.older.name + ".tmp")
        shutil.copyfile(self.path, tmp)
        os.replace(tmp, self.older)
        os.truncate(self.path, 0)
        return True

    def tail(self, max_bytes: int) -> bytes:
        """The last `max_bytes` of the log, the older file first."""
        chunks = []
        for path in (self.path, self.older):
            if max_bytes <= 0:
                break
            try:
                with open(path, "rb") as f:
                    size = f.seek(0, os.SEEK_END)
                    f.seek(max(0, size - max_bytes))
                    data = f.read()
            except FileNotFoundError:
                continue
            chunks.append(data)
            max_bytes -= len(data)
        return b"".join(reversed(chunks))

    async def follow(self, keep_going: Callable[[], bool]) -> AsyncIterator[bytes]:
        """New bytes as they are written, until `keep_going()` is false."""
        offset = self.path.stat().st_size if self.path.exists() else 0
        while keep_going():
            try:
                with open(self.path, "rb") as f:
                    size = f.seek(0, os.SEEK_END)
                    if size < offset:  # rotated: the file starts again
                        offset = 0
                    f.seek(offset)
                    data = f.read(1 << 20)
            except FileNotFoundError:
                data = b""
            if data:
                offset += len(data)
                yield data
            else:
                await asyncio.sleep(FOLLOW_POLL_SECONDS)
