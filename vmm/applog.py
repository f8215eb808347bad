"""A VM's app log: what its app wrote to stdout and stderr, in a bounded file per VM.

For disk images the manager writes `app.log` itself from the VM's console socket
(vmm/console.py, `append`): when the next bytes would take it past `max_bytes` it becomes
`app.log.1` (replacing the older one) and a new `app.log` starts. So, exactly:
- neither file ever holds more than `max_bytes`, whatever the guest writes and however fast;
- the two files hold the newest output, up to 2 * `max_bytes`, in order;
- output the guest writes while no manager reads its console (stopped, or too far behind) is
  dropped by QEMU, never buffered and never waited for.
The console of an initramfs guest (serial.log) and the console of a QEMU started before this
scheme are files that QEMU appends to itself: the manager checks those every
`APP_LOG_CHECK_SECONDS` (vmm/manager.py) and `rotate_if_needed` moves the newest `max_bytes`
to the older file, so that one never holds more than `max_bytes`, and the current one is back
within `max_bytes` at the first check after it crossed it.
Readers see the older file followed by the current one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

FOLLOW_POLL_SECONDS = 0.25


class AppLog:
    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.older = path.with_name(path.name + ".1")
        self.max_bytes = max_bytes

    def append(self, data: bytes) -> None:
        """Add console output; the file becomes the older one first whenever `data` would not fit."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        while data:
            if size >= self.max_bytes:
                if not self.rotate_if_needed():  # exactly full (more: only its newest max_bytes are kept)
                    os.replace(self.path, self.older)
                size = 0
            part, data = data[: self.max_bytes - size], data[self.max_bytes - size :]
            with open(self.path, "ab") as f:
                f.write(part)
            size += len(part)

    def rotate_if_needed(self) -> bool:
        """Keep the file under its bound; True if it rotated. Only the newest `max_bytes` are kept.

        Mostly the file is within its bound: one stat says so (the manager asks ten times a second
        per VM, and the edge's requests share its process)."""
        try:
            if os.stat(self.path).st_size <= self.max_bytes:
                return False
            with open(self.path, "r+b") as f:
                size = os.fstat(f.fileno()).st_size
                if size <= self.max_bytes:
                    return False
                f.seek(size - self.max_bytes)
                kept = f.read()  # to the end as it is now, with what the guest appended since the fstat
                os.ftruncate(f.fileno(), 0)
        except FileNotFoundError:
            return False
        tmp = self.older.with_name(self.older.name + ".tmp")
        tmp.write_bytes(kept[-self.max_bytes :])
        os.replace(tmp, self.older)
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
