"""A VM's app log: what its app wrote to stdout and stderr, in a bounded file per VM.

QEMU appends the guest's console output to `app.log` itself (a file chardev, O_APPEND), so
the guest never waits for this process: a stopped or busy manager never blocks the app.
The manager checks the file every `APP_LOG_CHECK_SECONDS` (vmm/manager.py). Once it is past
`max_bytes`, the newest `max_bytes` of it become `app.log.1` (replacing the older one) and it
is truncated in place; QEMU's appends continue at the new end. What this guarantees:
- `app.log.1` never holds more than `max_bytes`: this process writes it, whole, with a rename;
- `app.log` is back within `max_bytes` at the first check after it crossed it: between two
  checks it holds at most `max_bytes` plus what the guest wrote in that interval (and it is
  unbounded while no manager runs, e.g. after a stop with on_shutdown = "keep", until the next
  manager's first check);
- bytes the guest writes in the instant between the final read and the truncation are lost.
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

    def rotate_if_needed(self) -> bool:
        """Keep the file under its bound; True if it rotated. Only the newest `max_bytes` are kept."""
        try:
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
