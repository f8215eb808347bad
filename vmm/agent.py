"""The host end of a VM's guest agent: restore hygiene (clock, entropy, hostname), a fork child's own key, and exec.

The channel is a virtio-serial port whose QEMU chardev is a unix socket in the VM's
directory (root-only, never reachable through the edge). Frames both ways are
`u32 length | u8 type | u32 channel | payload` (guest/init/agent.h). One reader task
dispatches frames to their channel; each exec's output queue is bounded, so a slow
consumer stops the reader, QEMU's chardev, the guest agent and finally the process itself:
memory stays bounded however much the process writes.

Every byte from the guest is hostile (root in the guest can hold the port): a frame that
makes no sense fails the one call its channel belongs to, a frame for no call is dropped,
and a length that breaks the framing ends the channel with the reason. The reader never
dies of what it reads, and `close` never raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import signal
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from .errors import VmmError

ENTROPY_BYTES = 64
KEY_BYTES = 32  # the per-VM key every sync and exec carries (guest/init/agent.h)
_HEAD = struct.Struct(">IBI")
_SYNC_OK = struct.Struct(">QB")  # guest realtime ns after setting it, flags
_EXIT = struct.Struct(">i")  # exit status, or -signal
F_SYNC, F_SYNC_OK, F_EXEC, F_STDOUT, F_STDERR, F_EXIT, F_ERROR, F_STDIN, F_KILL = 1, 2, 10, 11, 12, 13, 14, 15, 16
F_PTY_EXEC, F_RESIZE, F_SYNC_REKEY = 17, 18, 3
SYNC_ENTROPY, SYNC_RESEEDED, SYNC_REKEYED = 1, 2, 4  # F_SYNC_OK's flags
_QUEUE_FRAMES = 64  # per exec: at most 64 frames waiting for their reader (the agent sends <= 256 KiB each)
MAX_FRAME = 1 << 20
# Frames for no call in a row that end the channel. An abandoned exec's last output and an earlier
# connection's leftovers are bounded by the guest agent's buffers (a few thousand frames); more is a
# guest flooding the manager's loop, which every VM shares.
MAX_NOISE_FRAMES = 100_000
_EXIT_CODES = range(-64, 256)  # what a guest can report: an exit status, or -signal


def load_key(path: Path) -> bytes:
    """The VM's agent key: made once (0600) when first asked for, then read back, also after a restart.

    Never through a symlink (nor blocked by a FIFO): the VM's directory is its QEMU's uid's, and a
    QEMU that broke out of its guest could plant one there to have root's files sent to the guest.
    """
    key = _read_key(path)
    if key is None:
        key = secrets.token_bytes(KEY_BYTES)
        store_key(path, key)
    return key


def copy_key(source: Path, target: Path) -> None:
    """The agent key in `source` (a VM's, a checkpoint's, a session template's) as `target`'s key file. A
    source that holds no key is an error, never replaced by a made-up one: its guest would not know it."""
    key = _read_key(source)
    if key is None:
        raise AgentError(f"{source} does not hold an agent key of {KEY_BYTES} bytes")
    store_key(target, key)


def _read_key(path: Path) -> bytes | None:
    """The key in `path`, read as load_key says; None if there is none or it is not KEY_BYTES long."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as file:
        key = file.read(KEY_BYTES + 1)
    return key if len(key) == KEY_BYTES else None


def store_key(path: Path, key: bytes) -> None:
    """`key` as the VM's agent key file, 0600 from its first byte, replacing the one there at once. Written
    aside and renamed, never through a name the VM's QEMU may have planted (see load_key)."""
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, key)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class AgentError(VmmError):
    """The guest agent did not answer, or its channel ended."""

    http_status = 502


@dataclass(frozen=True)
class SyncResult:
    """What a sync did: the guest clock's distance from the host's right after, and the RNG steps."""

    skew_ms: float
    entropy_added: bool
    crng_reseeded: bool
    took_ms: float


@dataclass(frozen=True)
class ExecEvent:
    kind: str  # stdout | stderr | exit | error
    data: bytes = b""
    code: int = 0  # exit: the status (0-255), or -signal (-64..-1)

    @property
    def signal_name(self) -> str:
        """The signal that ended the process ("SIGKILL"; "SIG40" for one Python has no name for)."""
        try:
            return signal.Signals(-self.code).name
        except ValueError:
            return f"SIG{-self.code}"


def _exec_event(kind: int, payload: bytes) -> ExecEvent:
    """What a frame on an exec's channel means; a frame that fits no event ends the exec with an error."""
    if kind in (F_STDOUT, F_STDERR):
        return ExecEvent("stdout" if kind == F_STDOUT else "stderr", payload)
    if kind == F_ERROR:
        return ExecEvent("error", payload)
    if kind == F_EXIT and len(payload) == _EXIT.size and _EXIT.unpack(payload)[0] in _EXIT_CODES:
        return ExecEvent("exit", code=_EXIT.unpack(payload)[0])
    return ExecEvent("error", f"the guest agent sent {_malformed(kind, payload)}".encode())


def _malformed(kind: int, payload: bytes) -> str:
    return f"a malformed frame (type {kind}, {len(payload)} bytes)"


class Exec:
    """One command running in the guest: its output as events, its stdin, a way to kill it."""

    def __init__(self, agent: Agent, channel: int) -> None:
        self.agent, self.channel = agent, channel
        self.events: asyncio.Queue[ExecEvent] = asyncio.Queue(_QUEUE_FRAMES)
        self.finished = False
        self.pending_error: bytes | None = None  # the channel ended while the queue was full

    async def write_stdin(self, data: bytes) -> None:
        """Bytes for the process's stdin; b"" closes it."""
        for start in range(0, max(len(data), 1), MAX_FRAME // 2):
            await self.agent.send(F_STDIN, self.channel, data[start : start + MAX_FRAME // 2])

    async def resize(self, rows: int, cols: int) -> None:
        """The terminal's new size (an exec started with a pty)."""
        await self.agent.send(F_RESIZE, self.channel, struct.pack(">HH", rows, cols))

    async def kill(self, signal: int = 9) -> None:
        """Best effort, never waiting: a guest that stops reading its port must not hold up who kills."""
        if not self.finished:
            with contextlib.suppress(AgentError):
                await self.agent.send(F_KILL, self.channel, bytes([signal]), drain=False)

    async def abandon(self) -> None:
        """Nobody reads this exec any more: kill it and drop its output, so other channels flow on."""
        await self.kill()
        self.finished = True
        self.agent.execs.pop(self.channel, None)
        while not self.events.empty():
            self.events.get_nowait()  # a reader blocked on this full queue moves on

    async def __aiter__(self) -> AsyncIterator[ExecEvent]:
        while not self.finished:
            if self.events.empty() and self.pending_error is not None:
                event = ExecEvent("error", self.pending_error)
            else:
                event = await self.events.get()
            if event.kind in ("exit", "error"):
                self.finished = True
                self.agent.execs.pop(self.channel, None)
            yield event


class Agent:
    """A connection to one VM's guest agent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes) -> None:
        self.reader, self.writer, self.key = reader, writer, key
        self.execs: dict[int, Exec] = {}
        self._replies: dict[int, asyncio.Future[tuple[int, bytes]]] = {}  # sync channel -> (kind, payload)
        # Numbered from a random start: frames an earlier connection's calls left in the guest (output of
        # an exec that ran across a suspend or a manager restart) never land on a call of this one.
        self._channels = itertools.count(1 + secrets.randbelow(1 << 31))
        self._closed: str | None = None
        self.dropped = 0  # frames for no waiting call: a guest's noise, or an abandoned exec's last output
        self._noise = 0  # of them, in a row
        self._task = asyncio.get_running_loop().create_task(self._read_frames())

    @classmethod
    async def connect(cls, sock: Path, key: bytes, timeout: float = 5.0) -> Agent:
        """Connect to the VM's agent socket; `key` is the VM's (KEY_BYTES, from load_key)."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(str(sock), limit=2 * MAX_FRAME)
        except (OSError, TimeoutError) as exc:
            raise AgentError(f"cannot reach the guest agent at {sock}: {exc}") from exc
        return cls(reader, writer, key)

    async def send(self, kind: int, channel: int, payload: bytes, drain: bool = True) -> None:
        """One frame; with `drain`, wait while the channel's buffer is full (the guest reads slowly)."""
        if self._closed is not None:
            raise AgentError(f"the guest agent's channel is closed: {self._closed}")
        try:
            self.writer.write(_HEAD.pack(len(payload) + 5, kind, channel) + payload)
            if drain:
                await self.writer.drain()
        except OSError as exc:
            raise AgentError(f"the guest agent's channel failed: {exc}") from exc

    async def sync(self, hostname: str, timeout: float, new_key: bytes | None = None) -> SyncResult:
        """Set the guest's wall clock, feed its RNG fresh host entropy and reseed it, set its hostname.

        With `new_key` (a fork's child, which woke knowing its parent's key) the sync also gives the
        guest that key: it answers, then takes only frames with it. This agent uses it once the answer
        says the guest took it; nothing else may be sent meanwhile (a frame with the old key is refused).
        """
        if new_key is not None and len(new_key) != KEY_BYTES:
            raise AgentError(f"a new agent key has {KEY_BYTES} bytes, not {len(new_key)}")
        channel = next(self._channels)
        reply: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._replies[channel] = reply
        started = time.monotonic()
        name = hostname.encode()
        try:
            async with asyncio.timeout(timeout):
                payload = self.key + (new_key or b"")
                payload += struct.pack(">QH", time.time_ns(), len(name)) + name + os.urandom(ENTROPY_BYTES)
                await self.send(F_SYNC if new_key is None else F_SYNC_REKEY, channel, payload)
                kind, answer = await reply
        except TimeoutError:
            raise AgentError(f"the guest agent did not answer a sync within {timeout * 1000:.0f} ms") from None
        finally:
            self._replies.pop(channel, None)
        if kind == F_ERROR:
            raise AgentError(f"the guest agent refused the sync: {answer.decode(errors='replace')}")
        if kind != F_SYNC_OK or len(answer) != _SYNC_OK.size:
            raise AgentError(f"the guest agent answered a sync with {_malformed(kind, answer)}")
        guest_ns, flags = _SYNC_OK.unpack(answer)
        if new_key is not None:
            if not flags & SYNC_REKEYED:
                raise AgentError("the guest agent answered the sync without taking its new key")
            self.key = new_key
        return SyncResult(
            skew_ms=(guest_ns - time.time_ns()) / 1e6,
            entropy_added=bool(flags & SYNC_ENTROPY),
            crng_reseeded=bool(flags & SYNC_RESEEDED),
            took_ms=(time.monotonic() - started) * 1000,
        )

    async def exec(
        self, argv: list[str], env: list[str], cwd: str, uid: int, gid: int, pty: tuple[int, int] | None = None
    ) -> Exec:
        """Start a command; its events come from the returned Exec. With `pty` (rows, cols) it gets a terminal."""
        channel = next(self._channels)
        strings = [*argv, *env, cwd]
        if any("\0" in s for s in strings):
            raise AgentError("argv, env and cwd must not contain NUL bytes")
        payload = struct.pack(">IIHH", uid, gid, len(argv), len(env)) + b"".join(s.encode() + b"\0" for s in strings)
        if pty is not None:
            payload = struct.pack(">HH", *pty) + payload
        payload = self.key + payload
        if len(payload) > MAX_FRAME - 16:
            raise AgentError("argv and env are too large (1 MiB at most)")
        ex = Exec(self, channel)
        self.execs[channel] = ex
        try:
            await self.send(F_EXEC if pty is None else F_PTY_EXEC, channel, payload)
        except BaseException:
            self.execs.pop(channel, None)
            raise
        return ex

    async def close(self, why: str) -> None:
        """End the channel; every exec still running gets an error event saying `why`. Never raises:
        the reader ends by itself on whatever the guest sent, so cancelling it is all that is left."""
        if self._closed is None:
            self._closed = why
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.writer.close()
        self._fail_all(why)

    def _fail_all(self, why: str) -> None:
        for ex in list(self.execs.values()):
            ex.pending_error = why.encode()
            with contextlib.suppress(asyncio.QueueFull):
                ex.events.put_nowait(ExecEvent("error", ex.pending_error))
        self.execs.clear()
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(AgentError(f"the guest agent's channel ended: {why}"))

    async def _read_frames(self) -> None:
        """Until the channel ends: every frame to its call. Whatever ends it is caught here, and every
        call still waiting gets an error saying why; nothing the guest sends kills this task."""
        try:
            while True:
                length, kind, channel = _HEAD.unpack(await self.reader.readexactly(_HEAD.size))
                if not 5 <= length <= MAX_FRAME + 5:
                    raise AgentError(f"the guest agent sent a frame of {length} bytes")
                payload = await self.reader.readexactly(length - 5)
                await self._dispatch(kind, channel, payload)
                # readexactly does not yield while whole frames are buffered: without this, a guest that
                # floods tiny frames would hold the manager's loop (every VM's calls) for each read's worth.
                await asyncio.sleep(0)
        except Exception as exc:
            self._closed = self._closed or f"the guest agent's channel ended ({str(exc) or type(exc).__name__})"
            self._fail_all(self._closed)

    async def _dispatch(self, kind: int, channel: int, payload: bytes) -> None:
        """A sync's answer goes to sync() to judge; an exec's frame becomes its event, and after its last
        one (exit or error) the channel is forgotten. Frames for no waiting call are dropped: an abandoned
        exec's last output, or a guest's noise; MAX_NOISE_FRAMES of them in a row end the channel."""
        reply = self._replies.get(channel)
        if reply is not None:
            self._noise = 0
            if not reply.done():
                reply.set_result((kind, payload))
            return
        ex = self.execs.get(channel)
        if ex is not None:
            self._noise = 0
            event = _exec_event(kind, payload)
            await ex.events.put(event)
            if event.kind in ("exit", "error"):
                self.execs.pop(channel, None)
            return
        self.dropped += 1
        self._noise += 1
        if self._noise > MAX_NOISE_FRAMES:
            raise AgentError(f"the guest agent sent over {MAX_NOISE_FRAMES} frames in a row for no call")
