"""QMP sequences for snapshots: save device state (and RAM if not shared) to a file, load it back.

Snapshots are QEMU migration streams written to / read from a file descriptor passed
over the QMP socket (SCM_RIGHTS), so no shell is involved. With x-ignore-shared, RAM in
a shared memory-backend-file is left out of the stream: it already is on disk.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from . import faults, snapshot_check
from .errors import VmmError

# QEMU 7.2 migrates at 32 MiB/s by default; a snapshot to a local file needs no cap.
MAX_BANDWIDTH = 100 * 1024**3
# A stream that carries RAM visits every page of the guest's memory at both ends (QEMU 7.2 reads each page
# to find zero pages, and reads each one it loads as zero): its time grows with the memory size, not with
# the stream's. On top of the caller's timeout it gets this long per byte of memory: 4 GiB took 9-27 s
# on a busy 2-core host (kernel time on page faults), so this floor leaves more than twice that.
RAM_VISIT_RATE = 64 << 20  # bytes of guest memory per second
_DONE = ("completed", "failed", "cancelled")


class Qmp(QMPClient):
    """A QMP client whose fd passing works under uvloop too.

    qemu.qmp sends SCM_RIGHTS through the transport's socket object, which uvloop does not
    expose; this client keeps its own descriptor of the same connection for that.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._fd_channel: socket.socket | None = None

    async def connect_unix(self, path: Path) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, str(path))
            self._fd_channel = socket.socket(fileno=os.dup(sock.fileno()))
            await self.connect(sock)
        except BaseException:
            sock.close()
            self._close_fd_channel()
            raise

    def send_fd_scm(self, fd: int) -> None:
        """Pass `fd` to QEMU; the one space byte that carries it is whitespace to QMP's parser."""
        if self._fd_channel is None:
            raise VmmError("QMP is not connected")
        self._fd_channel.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])

    async def disconnect(self) -> None:
        try:
            await super().disconnect()
        finally:
            self._close_fd_channel()

    async def disconnect_quietly(self) -> None:
        """Disconnect when QEMU may already be gone: its EOF is expected, not an error."""
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self.disconnect()

    def _close_fd_channel(self) -> None:
        if self._fd_channel is not None:
            self._fd_channel.close()
            self._fd_channel = None


async def connect(sock: Path, name: str, timeout: float, alive: Any) -> Qmp:
    """Connect once QEMU has created its socket; gives up early if QEMU died meanwhile."""
    async with asyncio.timeout(timeout):
        while True:
            if not alive():
                raise VmmError("QEMU exited before its QMP socket was up")
            if sock.exists():
                client = Qmp(name)
                try:
                    await client.connect_unix(sock)
                    return client
                except (QMPError, OSError):
                    pass
            await asyncio.sleep(0.002)


async def _capabilities(qmp: QMPClient, ignore_shared: bool) -> None:
    caps = [
        {"capability": "events", "state": True},
        {"capability": "x-ignore-shared", "state": ignore_shared},
    ]
    await qmp.execute("migrate-set-capabilities", {"capabilities": caps})


async def _run_migration(qmp: QMPClient, command: str, fd: int, timeout: float, exited: asyncio.Event) -> None:
    """Pass `fd`, start the migration `command` on it, wait for the MIGRATION event's end.

    The wait also watches `exited` (QEMU's end): a QEMU killed mid-migration (SIGBUS on a
    full disk, OOM) fails the wait at once instead of after `timeout`.
    """
    with qmp.listener(("MIGRATION",)) as events:
        qmp.send_fd_scm(fd)
        await qmp.execute("getfd", {"fdname": "snapshot"})
        await qmp.execute(command, {"uri": "fd:snapshot"})
        status = "unknown"
        died = asyncio.ensure_future(exited.wait())
        try:
            async with asyncio.timeout(timeout):
                while status not in _DONE:
                    event = asyncio.ensure_future(events.get())
                    await asyncio.wait((event, died), return_when=asyncio.FIRST_COMPLETED)
                    if not event.done():
                        event.cancel()
                        raise VmmError("QEMU exited during the migration")
                    data: Any = event.result()
                    status = data["data"]["status"]
        finally:
            died.cancel()
    if status != "completed":
        info: dict[str, Any] = {}
        with contextlib.suppress(QMPError, OSError, EOFError):
            info = await qmp.execute("query-migrate")  # type: ignore[assignment]
        raise VmmError(f"migration {status}: {info.get('error-desc', 'no detail from QEMU')}")


async def _with_ram(qmp: QMPClient, timeout: float, ignore_shared: bool) -> float:
    """`timeout` for a migration, lengthened by the guest's memory size when the stream carries RAM."""
    if ignore_shared:
        return timeout
    summary: Any = await qmp.execute("query-memory-size-summary")
    return timeout + int(summary["base-memory"]) / RAM_VISIT_RATE


async def save(qmp: QMPClient, path: Path, ignore_shared: bool, timeout: float, exited: asyncio.Event) -> int:
    """Write the stopped VM's snapshot to `path` atomically, its checksum first; returns its size in bytes.
    The checksum is read in a thread: a stream with RAM is gigabytes, and the event loop serves every VM."""
    await _capabilities(qmp, ignore_shared)
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
    timeout = await _with_ram(qmp, timeout, ignore_shared)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        await _run_migration(qmp, "migrate", fd, timeout, exited)
        faults.point("snapshot.saved")
        snapshot_check.write(path, await asyncio.to_thread(snapshot_check.file_digest, tmp))
    except BaseException:
        # A migration still running would stop the guest later behind the caller's back.
        with contextlib.suppress(QMPError, OSError, EOFError):
            await qmp.execute("migrate_cancel")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        os.close(fd)
    tmp.rename(path)
    return path.stat().st_size


async def load(qmp: QMPClient, path: Path, ignore_shared: bool, timeout: float, exited: asyncio.Event) -> None:
    """Load a snapshot into a QEMU started with `-incoming defer`; leaves it stopped."""
    await _capabilities(qmp, ignore_shared)
    timeout = await _with_ram(qmp, timeout, ignore_shared)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise VmmError(f"snapshot file {path} is missing") from exc
    try:
        await _run_migration(qmp, "migrate-incoming", fd, timeout, exited)
    finally:
        os.close(fd)


async def status(qmp: QMPClient) -> str:
    """QEMU's run state: running, paused, postmigrate, inmigrate, ..."""
    reply: Any = await qmp.execute("query-status")
    return str(reply["status"])


async def finalized(qmp: QMPClient, timeout: float) -> None:
    """Wait until a completed outgoing migration has left QEMU's finish-migrate state: the MIGRATION
    event comes first, and `cont` before then fails ("Migration is not finalized yet")."""
    async with asyncio.timeout(timeout):
        while await status(qmp) == "finish-migrate":
            await asyncio.sleep(0.002)


async def end_block_jobs(qmp: QMPClient, timeout: float) -> None:
    """Cancel a background flatten (block-stream) and wait for its end: a migration, or a copy of the disk,
    must not run beside it. A cancelled stream leaves the chain as it was, with what it had copied."""
    jobs: Any = await qmp.execute("query-block-jobs")
    for job in jobs:
        with contextlib.suppress(QMPError):
            await qmp.execute("block-job-cancel", {"device": job["device"]})
    async with asyncio.timeout(timeout):
        while jobs:
            await asyncio.sleep(0.01)
            jobs = await qmp.execute("query-block-jobs")
