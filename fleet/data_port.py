"""The data port: how an edge on another machine reaches a guest, one tunnel per upstream connection.

A guest's namespace exists only on its host, so a remote edge connects to the host's data
port and asks for `vm_id:port` in one line signed with the cluster secret (HMAC-SHA256
over the request and a timestamp: the secret never crosses the wire and a captured line
is useless after SKEW seconds). The host connects to the guest inside its namespace,
answers `OK`, and from then on copies bytes both ways.

With cluster TLS (`cluster.tls`, fleet/cluster_tls.py) the port speaks mutual TLS: only a peer
with an edge certificate from a trusted CA gets as far as the request line, and the edge checks
the host's certificate. The proxy takes its upstream as a socket, so the edge's end of a TLS
tunnel is a local socket pair relayed to the TLS stream. Plaintext is for loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import socket
import ssl
import time
from collections.abc import Callable

from vmm.errors import NotFound, VmFailed, VmmError
from vmm.jsonlog import log
from vmm.model import GUEST_GOING_AWAY, VmRecord
from vmm.network import netns

from .cluster_tls import ClusterTls, is_loopback

MAGIC = "MVM-TUNNEL"
SKEW = 30.0  # seconds a signed request stays valid
MAX_LINE = 512
CHUNK = 65536


def sign(secret: str, vm_id: str, port: int, at: int) -> str:
    return hmac.new(secret.encode(), f"{vm_id} {port} {at}".encode(), hashlib.sha256).hexdigest()


def request_line(secret: str, vm_id: str, port: int) -> bytes:
    at = int(time.time())
    return f"{MAGIC} {vm_id} {port} {at} {sign(secret, vm_id, port, at)}\r\n".encode()


_RELAYS: dict[asyncio.Task[None], asyncio.StreamWriter] = {}  # the TLS tunnels' relays and their host ends


def recheck_relays(trusts: Callable[[ssl.SSLObject | None], bool]) -> int:
    """After an edge reloads its cluster files: tunnels to hosts it no longer trusts end now; how many."""
    cut = 0
    for writer in list(_RELAYS.values()):
        if not trusts(writer.get_extra_info("ssl_object")):
            log.event("edge.tunnel_host_untrusted", level="warning", host=str(writer.get_extra_info("peername")))
            writer.transport.abort()
            cut += 1
    return cut


async def open_tunnel(
    address: str, secret: str, vm_id: str, port: int, timeout: float, tls: ssl.SSLContext | None = None
) -> socket.socket:
    """A connected non-blocking socket that carries bytes to and from the guest's port, via its host.

    With `tls` the tunnel is mutual TLS to the host; without, the host must be on loopback.
    """
    host, _, port_text = address.rpartition(":")
    if tls is not None:
        return await _open_tls_tunnel(host.strip("[]"), int(port_text), secret, vm_id, port, timeout, tls)
    if not is_loopback(host):
        raise VmFailed(f"the data port {address} of VM {vm_id}'s host is not on loopback: plaintext refused"
                       " (set cluster.tls = true)")  # fmt: skip
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (host.strip("[]"), int(port_text)))
            await loop.sock_sendall(sock, request_line(secret, vm_id, port))
            answer = await _read_line(loop, sock)
    except (OSError, TimeoutError) as exc:
        sock.close()
        raise VmFailed(f"cannot reach VM {vm_id} through its host's data port {address}: {exc}") from exc
    if answer != "OK":
        sock.close()
        raise VmFailed(f"the host's data port refused a tunnel to VM {vm_id}:{port}: {answer}")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def _open_tls_tunnel(
    host: str, data_port: int, secret: str, vm_id: str, port: int, timeout: float, tls: ssl.SSLContext
) -> socket.socket:
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, data_port, ssl=tls, server_hostname=host, limit=CHUNK)
    except (OSError, TimeoutError) as exc:
        raise VmFailed(f"cannot reach VM {vm_id} through its host's data port {host}:{data_port}: {exc}") from exc
    try:
        async with asyncio.timeout(timeout):
            writer.write(request_line(secret, vm_id, port))
            answer = (await reader.readuntil(b"\r\n")).decode(errors="replace").strip()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        writer.transport.abort()
        raise VmFailed(f"the host's data port {host}:{data_port} ended the tunnel to VM {vm_id}: {exc!r}") from exc
    if answer != "OK":
        writer.transport.abort()
        raise VmFailed(f"the host's data port refused a tunnel to VM {vm_id}:{port}: {answer}")
    ours, relayed = socket.socketpair()
    ours.setblocking(False)
    task = asyncio.create_task(_relay(reader, writer, relayed))
    _RELAYS[task] = writer
    task.add_done_callback(lambda done: _RELAYS.pop(done, None))
    return ours


async def _relay(remote: asyncio.StreamReader, remote_writer: asyncio.StreamWriter, sock: socket.socket) -> None:
    """Copy between the TLS tunnel and the local socket pair until either end closes.

    TLS has no half-close, so either end closing (or failing) ends both: the proxy reads the
    end of its upstream, the host sees its tunnel go.
    """
    try:
        local, local_writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
    except OSError:
        sock.close()
        remote_writer.transport.abort()
        return

    async def down() -> None:
        with contextlib.suppress(OSError):
            await _pump(remote, local_writer)
        local_writer.close()  # the proxy reads the end; our read of its side ends too

    from_host = asyncio.create_task(down())
    try:
        with contextlib.suppress(OSError):
            await _pump(local, remote_writer)
    finally:
        from_host.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await from_host
        remote_writer.transport.abort()
        local_writer.close()


async def _read_line(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> str:
    """The answer line only: peeked first, so no byte the guest sends after it is consumed here."""
    while True:
        peeked = await _peek(loop, sock)
        end = peeked.find(b"\r\n")
        if end >= 0:
            await loop.sock_recv(sock, end + 2)
            return peeked[:end].decode(errors="replace")
        if len(peeked) >= MAX_LINE:
            raise OSError("the data port's answer line is too long")


async def wait_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Until `sock` has something to read, for reads the loop has no coroutine for (a peek, SCM_RIGHTS)."""
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), readable)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    await wait_readable(loop, sock)
    data = sock.recv(MAX_LINE, socket.MSG_PEEK)
    if not data:
        raise OSError("the data port closed the connection")
    return data


class DataPort:
    """The host's side: checks each request line, connects to the guest, then relays."""

    def __init__(
        self, secret: str, vm_exists: Callable[[str, int], bool], connect_timeout: float = 5.0,
        tls: ClusterTls | None = None,
    ) -> None:  # fmt: skip
        self.secret = secret
        self.vm_exists = vm_exists
        self.connect_timeout = connect_timeout
        self.tls = tls
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tunnels: dict[str, set[asyncio.StreamWriter]] = {}  # by VM: the edge's end of each tunnel

    async def start(self, host: str, port: int) -> None:
        if self.tls is None:
            self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_LINE)
        else:  # a peer that does not finish its handshake holds a connection as long as one that sends no line
            self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_LINE, ssl=self.tls.context,
                                                      ssl_handshake_timeout=self.connect_timeout)  # fmt: skip
        if self.tls is not None:
            self.tls.listeners.append(self.recheck_peers)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, drain: float = 0.0) -> int:
        """Take no new tunnel; those open get `drain` seconds to end on their own, then are cut.

        Returns how many were cut. (A tunnel is a byte relay: an idle keep-alive connection of
        an edge's pool looks like a request in flight, so it holds the drain until it closes.)
        """
        if self._server is not None:
            self._server.close()
        if self._tasks and drain > 0:
            await asyncio.wait(list(self._tasks), timeout=drain)
        cut = len(self._tasks)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return cut

    def vm_changed(self, rec: VmRecord) -> None:
        """A manager listener: when a VM's QEMU goes away, its tunnels end at once (before the
        transition that stops it is answered), so no edge sends a request into a tunnel to a
        guest that is gone; the edge's next connect asks the host, which wakes the VM."""
        if rec.state in GUEST_GOING_AWAY:
            for writer in self._tunnels.pop(rec.id, ()):
                writer.transport.abort()

    def recheck_peers(self) -> None:
        """After a reload of the cluster's certificates: tunnels of edges no longer trusted end now."""
        assert self.tls is not None
        for vm_id, writers in list(self._tunnels.items()):
            for writer in list(writers):
                if not self.tls.trusts(writer.get_extra_info("ssl_object")):
                    log.event("data_port.peer_untrusted", level="warning", vm=vm_id,
                              peer=str(writer.get_extra_info("peername")))  # fmt: skip
                    writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Each tunnel runs in a task of ours, so stop() can cancel it without asyncio's streams
        reporting a cancelled connection callback as an error."""
        task = asyncio.create_task(self._tunnel(reader, writer))
        self._tasks.add(task)
        try:
            await asyncio.wait((task,))
        finally:
            self._tasks.discard(task)
            task.cancel()
            writer.close()
        if not task.cancelled() and isinstance(task.exception(), Exception):
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                                     TimeoutError):  # fmt: skip
                task.result()

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(self.connect_timeout):
            line = (await reader.readuntil(b"\r\n")).decode(errors="replace").strip()
        try:
            if self.tls is not None and not self.tls.trusts(writer.get_extra_info("ssl_object")):
                raise VmmError("the edge's certificate is no longer trusted by this host")
            vm_id, port = self._check(line)
            guest = await netns.connect_guest(vm_id, port, self.connect_timeout)
        except (VmmError, OSError) as exc:
            log.event("data_port.refused", level="warning", peer=str(writer.get_extra_info("peername")), error=str(exc))
            writer.write(f"ERR {exc}\r\n".encode())
            await writer.drain()
            return
        up_reader, up_writer = await asyncio.open_connection(sock=guest, limit=CHUNK)
        writer.write(b"OK\r\n")
        tunnels = self._tunnels.setdefault(vm_id, set())
        tunnels.add(writer)
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            up_writer.close()
            tunnels.discard(writer)
            if not tunnels and self._tunnels.get(vm_id) is tunnels:
                del self._tunnels[vm_id]

    def _check(self, line: str) -> tuple[str, int]:
        parts = line.split(" ")
        if len(parts) != 5 or parts[0] != MAGIC or not parts[2].isdigit() or not parts[3].isdigit():
            raise VmmError("malformed tunnel request")
        _, vm_id, port_text, at_text, mac = parts
        port, at = int(port_text), int(at_text)
        if abs(time.time() - at) > SKEW or not hmac.compare_digest(mac, sign(self.secret, vm_id, port, at)):
            raise VmmError("tunnel request not signed with the cluster secret (or too old)")
        if not self.vm_exists(vm_id, port):
            raise NotFound(f"no VM {vm_id} with port {port} on this host")
        return vm_id, port


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await src.read(CHUNK):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
