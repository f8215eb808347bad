"""One network namespace per VM, with the VM's tap inside it.

Every namespace has identical addressing (host side 10.77.0.1, guest 10.77.0.2, fixed
MACs), so clones of one snapshot need no reconfiguration. Nothing is ever added to the
root namespace: the edge reaches a guest by creating its socket inside the VM's
namespace (setns in a worker thread), so guests cannot reach each other, the host's
root namespace or anything outside — there is no route, bridge or forwarding. The one way
out is the VM's egress proxy (vmm.network.egress_proxy), listening on HOST_IP:EGRESS_PORT inside
the namespace (listen_in) and dialling out, as the VM's egress policy allows, from the edge.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import re
import socket
import struct
import threading
from pathlib import Path

from ..errors import VmmError
from ..tasks import to_its_end

HOST_IP = "10.77.0.1"
GUEST_IP = "10.77.0.2"
PREFIX = 24
TAP = "tap0"
TAP_MAC = "02:00:00:77:00:01"
GUEST_MAC = "52:54:00:12:34:56"
NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000
# The egress proxy of each VM listens on HOST_IP:EGRESS_PORT inside the VM's namespace.
EGRESS_PORT = 3128
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

_libc = ctypes.CDLL(None, use_errno=True)
_setns_lock = threading.Lock()


def ns_name(vm_id: str) -> str:
    """Namespace name for a VM; the prefix marks what this project created."""
    return f"mvm-{vm_id}"


async def _ip(*args: str) -> None:
    await _run("ip", *args)


async def _run(*argv: str, stdin: bytes | None = None) -> None:
    """Run one `ip`/`ss` command. Cancelled, it still waits for the command to end: a namespace
    being made when its VM's launch is cancelled exists once this returns, for the undo to find."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await to_its_end(proc.communicate(stdin))
    if proc.returncode != 0:
        raise VmmError(f"{' '.join(argv)} failed: {err.decode().strip()}")


# The namespace's set-up, one `ip -batch` (a process per command cost ~17 ms each on a busy host).
_SETUP = (
    "link set lo up",
    f"tuntap add dev {TAP} mode tap",
    f"link set {TAP} address {TAP_MAC}",
    f"addr add {HOST_IP}/{PREFIX} dev {TAP}",
    f"link set {TAP} up",
    # A static neighbour entry: without it the first connect to a waking guest waits on ARP.
    f"neigh replace {GUEST_IP} lladdr {GUEST_MAC} dev {TAP} nud permanent",
)


async def create(vm_id: str) -> str:
    """Create the VM's namespace with lo and a tap (addressed inside the namespace only)."""
    name = ns_name(vm_id)
    if (NETNS_DIR / name).exists():
        await delete(vm_id)
    await _ip("netns", "add", name)
    try:
        await _run("ip", "-n", name, "-batch", "-", stdin="\n".join(_SETUP).encode() + b"\n")
    except VmmError:
        await delete(vm_id)
        raise
    return name


async def delete(vm_id: str) -> None:
    """Remove the namespace (and with it the tap). Missing namespaces are fine."""
    if (NETNS_DIR / ns_name(vm_id)).exists():
        await _ip("netns", "delete", ns_name(vm_id))


async def cut_guest(vm_id: str) -> None:
    """The guest is about to stop running (suspend, failure, delete): no connection to it
    may outlive that QEMU, wherever it was opened from.

    An unreachable route makes every new connect fail at once (an edge with a stale view
    asks the VM's host and retries, instead of waiting on a guest that is gone), and every
    TCP socket to the guest is destroyed (SOCK_DESTROY), so an edge that pooled one, in this
    process or another, finds it dead before it could write a request on it.
    """
    name = ns_name(vm_id)
    if not (NETNS_DIR / name).exists():
        return
    # The route first: no connection can be made after the sockets were listed for destruction.
    await _ip("-n", name, "route", "replace", "unreachable", f"{GUEST_IP}/32")
    await _run("ss", "-N", name, "-K", "-t", "-n", "dst", GUEST_IP)


async def uncut_guest(vm_id: str) -> None:
    """The guest runs again (restored, or a suspend was undone): connections reach it again."""
    name = ns_name(vm_id)
    try:
        await _ip("-n", name, "route", "del", "unreachable", f"{GUEST_IP}/32")
    except VmmError as exc:
        if "No such process" not in str(exc):  # the route was not there: nothing to undo
            raise


_LAST_SEEN = re.compile(rb"\blast(?:snd|rcv):(\d+)")


async def guest_traffic_age(vm_id: str) -> float | None:
    """Seconds since bytes last moved on any connection to the guest's own ports, as its namespace
    sees them (every edge's, wherever it runs, and every data-port tunnel); None: there is none.

    The guest's own outbound connections (through the egress proxy) are not counted: activity is
    what is asked of the VM. An edge reports its requests to a remote host only in batches, so
    this is what tells the host that a request reached the guest a moment ago.
    """
    name = ns_name(vm_id)
    if not (NETNS_DIR / name).exists():
        return None
    proc = await asyncio.create_subprocess_exec(
        "ss", "-N", name, "-tinH", "state", "established",
        "dst", GUEST_IP, "and", "sport", "!=", f":{EGRESS_PORT}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise VmmError(f"ss in the namespace of VM {vm_id} failed: {err.decode().strip()}")
    return traffic_age(out)


def traffic_age(ss_info: bytes) -> float | None:
    """The youngest lastsnd/lastrcv (milliseconds) of `ss -ti` output, in seconds; None: no socket."""
    ages = [int(ms) for ms in _LAST_SEEN.findall(ss_info)]
    return min(ages) / 1000 if ages else None


def tap_bytes(vm_id: str) -> tuple[int, int] | None:
    """The tap's (rx, tx) byte counters, host side (rx: what the guest sent); None: no namespace.

    Read from /proc/thread-self/net/dev with this thread in the VM's namespace for a moment:
    no subprocess, so a scrape of many VMs stays cheap.
    """
    path = NETNS_DIR / ns_name(vm_id)
    try:
        target = open(path)  # noqa: SIM115 - closed below, after the thread is home again
    except FileNotFoundError:
        return None
    with _setns_lock, target, open(f"/proc/self/task/{threading.get_native_id()}/ns/net") as home:
        _setns(target.fileno())
        try:
            text = Path("/proc/thread-self/net/dev").read_text()
        finally:
            _setns(home.fileno())
    return dev_bytes(text, TAP)


def dev_bytes(net_dev: str, interface: str) -> tuple[int, int] | None:
    """(rx bytes, tx bytes) of `interface` in /proc/net/dev's format."""
    for line in net_dev.splitlines()[2:]:
        name, _, counters = line.partition(":")
        if name.strip() == interface:
            fields = counters.split()
            return int(fields[0]), int(fields[8])
    return None


def exists(vm_id: str) -> bool:
    return (NETNS_DIR / ns_name(vm_id)).exists()


def list_project_namespaces() -> list[str]:
    """Namespaces this project made (for cleanup checks)."""
    if not NETNS_DIR.exists():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith("mvm-"))


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _socket_in_netns(vm_id: str) -> socket.socket:
    """Create a TCP socket inside the VM's namespace; the socket keeps that namespace."""
    path = NETNS_DIR / ns_name(vm_id)
    with _setns_lock, open(path) as target, open(f"/proc/self/task/{threading.get_native_id()}/ns/net") as home:
        _setns(target.fileno())
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            _setns(home.fileno())
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _open_tap_in_netns(vm_id: str) -> int:
    """/dev/net/tun attached to the namespace's tap (a tun fd belongs to the namespace it was opened in)."""
    path = NETNS_DIR / ns_name(vm_id)
    with _setns_lock, open(path) as target, open(f"/proc/self/task/{threading.get_native_id()}/ns/net") as home:
        _setns(target.fileno())
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        finally:
            _setns(home.fileno())
    try:
        # IFF_VNET_HDR as QEMU sets it when it opens the tap itself: a snapshot's virtio-net state depends on it.
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", TAP.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except BaseException:
        os.close(fd)
        raise
    return fd


async def open_tap(vm_id: str) -> int:
    """The VM's tap as a file descriptor, for a QEMU that cannot open it itself (vmm/jail.py)."""
    if not exists(vm_id):
        raise VmmError(f"network namespace of VM {vm_id} is missing")
    try:
        return await asyncio.get_running_loop().run_in_executor(None, _open_tap_in_netns, vm_id)
    except OSError as exc:
        raise VmmError(f"could not open the tap of {ns_name(vm_id)}: {exc}") from exc


async def _new_socket(vm_id: str) -> socket.socket:
    """A TCP socket of the VM's namespace, made in a worker thread so setns never touches the event loop's."""
    if not exists(vm_id):
        raise VmmError(f"network namespace of VM {vm_id} is missing")
    return await asyncio.get_running_loop().run_in_executor(None, _socket_in_netns, vm_id)


async def connect_guest(vm_id: str, port: int, timeout: float) -> socket.socket:
    """A non-blocking socket connected to the guest's port, from inside the VM's namespace."""
    sock = await _new_socket(vm_id)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (GUEST_IP, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def listen_in(vm_id: str, host: str, port: int, backlog: int = 64) -> socket.socket:
    """A non-blocking listening socket inside the VM's namespace: only that VM's guest can reach it.

    For the egress proxy (host HOST_IP, port EGRESS_PORT); the socket keeps the namespace it
    was made in, so binding it here, outside the worker thread, binds it there.
    """
    sock = await _new_socket(vm_id)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
