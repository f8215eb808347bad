"""The host hands unprivileged edge workers of its set connections made inside VM namespaces.

Entering a namespace takes CAP_SYS_ADMIN, which a worker parsing untrusted HTTP must not hold.
So the host (root) listens on a unix socket in the set's run directory that only the worker
user and root can open. A worker sends one line, `<vm id> <port> <timeout ms>`; the host
connects to that port of its guest, from inside the VM's namespace, and passes the connected
socket back with SCM_RIGHTS. One short exchange per new upstream connection, which the
worker's pool then keeps. The answer's first byte says what happened:
  `+` and one descriptor: connected;
  `-`: no such VM on this host (the worker tunnels through the VM's host instead);
  `!<errno> <message>`: the connect failed, raised in the worker as that OSError.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

from vmm.jsonlog import log

from .data_port import wait_readable

ANSWER_MAX = 512
REQUEST_MAX = 128
MAX_TIMEOUT = 60.0  # seconds: a worker cannot make the host hold a connect longer than this
ConnectGuest = Callable[[str, int, float], Awaitable[socket.socket | None]]  # None: no such VM here


class NotHere(Exception):
    """The host of this set does not have the VM: reach it through its own host."""


class UpstreamBroker:
    """The host's end: accepts workers' requests and answers each with a connected socket."""

    def __init__(self, path: Path, connect: ConnectGuest, peer_uid: int) -> None:
        self.path = path
        self._connect = connect
        self._peer_uid = peer_uid  # the workers' uid (root is always let in)
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._answering: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            listener.bind(str(self.path))
            os.chown(self.path, self._peer_uid, -1)
            os.chmod(self.path, 0o600)
            listener.listen(256)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept_forever())

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        for task in list(self._answering):
            task.cancel()
        await asyncio.gather(*self._answering, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _accept_forever(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            task = asyncio.create_task(self._answer(conn))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)

    async def _answer(self, conn: socket.socket) -> None:
        with conn:
            if _peer_uid(conn) not in (0, self._peer_uid):
                return
            try:
                async with asyncio.timeout(MAX_TIMEOUT):
                    request = await _read_line(conn)
                vm_id, port, timeout = _parse(request)
                upstream = await self._connect(vm_id, port, timeout)
            except NotHere:
                upstream = None
            except ValueError as exc:
                log.event("broker.bad_request", level="warning", error=str(exc))
                return
            except (OSError, TimeoutError) as exc:
                code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.ETIMEDOUT
                _send(conn, f"!{code} {exc}".encode()[:ANSWER_MAX])
                return
            if upstream is None:
                _send(conn, b"-")
                return
            with upstream:
                _send(conn, b"+", upstream.fileno())


async def ask(path: Path, vm_id: str, port: int, timeout: float) -> socket.socket:
    """The worker's end: a socket connected to the guest's port, made by the host.

    Raises NotHere when the host does not have the VM, and the connect's OSError when it failed.
    """
    loop = asyncio.get_running_loop()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with conn:
        conn.setblocking(False)
        async with asyncio.timeout(timeout + 1.0):
            await loop.sock_connect(conn, str(path))
            await loop.sock_sendall(conn, f"{vm_id} {port} {round(timeout * 1000)}\n".encode())
            await wait_readable(loop, conn)
        answer, fds, _, _ = socket.recv_fds(conn, ANSWER_MAX, 1)
    if answer == b"+" and len(fds) == 1:
        upstream = socket.socket(fileno=fds[0])
        upstream.setblocking(False)
        return upstream
    for fd in fds:
        os.close(fd)
    if answer == b"-":
        raise NotHere(vm_id)
    if answer.startswith(b"!"):
        code, _, message = answer[1:].decode(errors="replace").partition(" ")
        raise OSError(int(code) if code.isdigit() else errno.EIO, message)
    raise OSError(errno.EIO, f"upstream broker: unexpected answer {answer[:40]!r}")


def _parse(request: bytes) -> tuple[str, int, float]:
    parts = request.decode("ascii", errors="replace").split()
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit() or not 0 < int(parts[1]) < 65536:
        raise ValueError(f"not `<vm id> <port> <timeout ms>`: {request[:80]!r}")
    return parts[0], int(parts[1]), min(int(parts[2]) / 1000, MAX_TIMEOUT)


async def _read_line(conn: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while not data.endswith(b"\n"):
        chunk = await loop.sock_recv(conn, REQUEST_MAX)
        if not chunk or len(data) + len(chunk) > REQUEST_MAX:
            raise ValueError("a request line longer than allowed, or none")
        data += chunk
    return data


def _send(conn: socket.socket, answer: bytes, fd: int | None = None) -> None:
    with contextlib.suppress(OSError):  # the worker gave up waiting: nothing to tell it
        socket.send_fds(conn, [answer], [fd] if fd is not None else [])


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])
