"""The host end of a VM's app console: QEMU's socket chardev, read into the VM's bounded app log.

The manager, not QEMU, writes app.log, so the files on disk never pass their bound
(vmm/applog.py). QEMU's virtio console drops what a chardev cannot take at once instead of
stalling the guest, so a manager that is slow, stopped or gone never blocks the app: its
output is lost for that time instead (checked with a real guest: see tests/e2e).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from .applog import AppLog
from .jsonlog import log

READ_CHUNK = 1 << 16
DRAIN_SECONDS = 2.0  # after QEMU ended: how long the last buffered bytes may take to arrive


class ConsoleReader:
    """One VM's console socket, pumped into its AppLog until QEMU closes it or the manager stops."""

    def __init__(self, vm_id: str, writer: asyncio.StreamWriter, task: asyncio.Task[None]) -> None:
        self.vm_id, self._writer, self._task = vm_id, writer, task

    @classmethod
    async def open(cls, vm_id: str, sock: Path, app_log: AppLog) -> ConsoleReader | None:
        """Connect to QEMU's console socket; None (logged) when there is none, e.g. a QEMU started before."""
        try:
            reader, writer = await asyncio.open_unix_connection(str(sock))
        except OSError as exc:
            log.event("vm.console_unavailable", level="warning", vm=vm_id, error=str(exc))
            return None
        task = asyncio.get_running_loop().create_task(_pump(vm_id, reader, app_log))
        return cls(vm_id, writer, task)

    async def close(self, drain: bool) -> None:
        """Stop reading; with `drain` (QEMU has ended), first take what it still had buffered."""
        if drain:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), DRAIN_SECONDS)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._writer.close()


async def _pump(vm_id: str, reader: asyncio.StreamReader, app_log: AppLog) -> None:
    try:
        while data := await reader.read(READ_CHUNK):
            app_log.append(data)
    except OSError as exc:
        log.event("vm.console_failed", level="warning", vm=vm_id, error=str(exc))
