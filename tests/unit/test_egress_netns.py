"""listen_in in a throwaway namespace (mvmx-egress-*, never the mvm- prefix the e2e suite reaps)."""

import asyncio
import fcntl
import os
import shutil
import subprocess

import pytest

from vmm import netns
from vmm.errors import VmmError

SIOCGSKNS = 0x894C  # an fd of the network namespace a socket belongs to


async def test_listen_in_needs_the_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "ns_name", lambda vm_id: "mvmx-egress-absent")
    with pytest.raises(VmmError, match="missing"):
        await netns.listen_in("vabsent", netns.HOST_IP, netns.EGRESS_PORT)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and iproute2")
async def test_listen_in_makes_the_socket_inside_the_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"mvmx-egress-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        monkeypatch.setattr(netns, "ns_name", lambda vm_id: name)
        listener = await netns.listen_in("vx", "127.0.0.1", 0)
        client = await asyncio.get_running_loop().run_in_executor(None, netns._socket_in_netns, "vx")
        try:
            ns_fd = fcntl.ioctl(listener.fileno(), SIOCGSKNS)
            try:
                assert os.fstat(ns_fd).st_ino == os.stat(netns.NETNS_DIR / name).st_ino
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
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True, timeout=10)
