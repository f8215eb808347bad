"""listen_in and EgressProxies in a throwaway namespace (mvmx-egress-*, never the mvm- prefix the e2e suite reaps)."""

import asyncio
import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from edge.metrics import Metrics
from vmm.errors import VmmError
from vmm.network import netns
from vmm.network.egress import EgressPolicy
from vmm.network.egress_proxy import EgressProxies

SIOCGSKNS = 0x894C  # an fd of the network namespace a socket belongs to
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and iproute2")


@pytest.fixture
def namespace(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A namespace with only lo (up) that every VM id maps to."""
    name = f"mvmx-egress-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        monkeypatch.setattr(netns, "ns_name", lambda vm_id: name)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True, timeout=10)


async def test_listen_in_needs_the_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "ns_name", lambda vm_id: "mvmx-egress-absent")
    with pytest.raises(VmmError, match="missing"):
        await netns.listen_in("vabsent", netns.HOST_IP, netns.EGRESS_PORT)


@needs_root
async def test_listen_in_makes_the_socket_inside_the_namespace(namespace: str) -> None:
    listener = await netns.listen_in("vx", "127.0.0.1", 0)
    client = await asyncio.get_running_loop().run_in_executor(None, netns._socket_in_netns, "vx")
    try:
        ns_fd = fcntl.ioctl(listener.fileno(), SIOCGSKNS)
        try:
            assert os.fstat(ns_fd).st_ino == os.stat(netns.NETNS_DIR / namespace).st_ino
        finally:
            os.close(ns_fd)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(5):
            await loop.sock_connect(client, listener.getsockname())
            accepted, _ = await loop.sock_accept(listener)
        accepted.close()
    finally:
        client.close()
        listener.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@needs_root
async def test_a_guest_side_client_tunnels_out_to_the_root_namespace(namespace: str) -> None:
    target = await asyncio.start_server(_echo, "127.0.0.1", 0)
    target_port = target.sockets[0].getsockname()[1]
    proxies = EgressProxies(Metrics().egress, host="127.0.0.1")
    try:
        await proxies.open("vx", EgressPolicy.from_json([f"127.0.0.1:{target_port}"]))
        guest = await asyncio.get_running_loop().run_in_executor(None, netns._socket_in_netns, "vx")
        async with asyncio.timeout(5):
            await asyncio.get_running_loop().sock_connect(guest, ("127.0.0.1", netns.EGRESS_PORT))
            reader, writer = await asyncio.open_connection(sock=guest)
            writer.write(f"CONNECT 127.0.0.1:{target_port} HTTP/1.1\r\n\r\nhi".encode())
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection established\r\n\r\n"
            assert await reader.readexactly(2) == b"hi"
            await proxies.close("vx")
            assert await reader.read(-1) == b""
        writer.close()
    finally:
        await proxies.close_all()
        target.close()
        await target.wait_closed()


def test_traffic_age_is_the_youngest_last_send_or_receive() -> None:
    out = (
        b"0 0 10.77.0.1:4000 10.77.0.2:8080\n\t cubic lastsnd:4200 lastrcv:3900 lastack:3900\n"
        b"0 0 10.77.0.1:4001 10.77.0.2:8080\n\t cubic lastsnd:120 lastrcv:15000 lastack:120\n"
    )
    assert netns.traffic_age(out) == 0.12
    assert netns.traffic_age(b"") is None
