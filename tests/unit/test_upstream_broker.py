"""The host's upstream broker against a stand-in guest: a TCP listener on 127.0.0.1."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fleet.upstream_broker import NotHere, UpstreamBroker, ask


@pytest.fixture
async def guest() -> AsyncIterator[int]:
    """A stand-in guest app: answers `hello` to whoever connects."""

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def _connect(vm_id: str, port: int, timeout: float) -> socket.socket:
    if vm_id == "elsewhere":
        raise NotHere(vm_id)
    if vm_id == "refusing":
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[UpstreamBroker]:
    broker = UpstreamBroker(tmp_path / "upstreams.sock", _connect, os.getuid())
    await broker.start()
    yield broker
    await broker.stop()


async def test_a_worker_gets_a_connected_socket(broker: UpstreamBroker, guest: int) -> None:
    sock = await ask(broker.path, "vm1", guest, 2.0)
    with sock:
        assert not sock.getblocking()
        assert await asyncio.get_running_loop().sock_recv(sock, 16) == b"hello"


async def test_a_vm_of_another_host_is_not_here(broker: UpstreamBroker) -> None:
    with pytest.raises(NotHere):
        await ask(broker.path, "elsewhere", 8080, 2.0)


async def test_a_failed_connect_is_raised_with_its_errno(broker: UpstreamBroker) -> None:
    with pytest.raises(OSError) as info:
        await ask(broker.path, "refusing", 8080, 2.0)
    assert info.value.errno == errno.ECONNREFUSED


async def test_a_malformed_request_gets_no_socket(broker: UpstreamBroker) -> None:
    reader, writer = await asyncio.open_unix_connection(str(broker.path))
    writer.write(b"vm1 not-a-port 1000\n")
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without an answer
    writer.close()


async def test_the_socket_file_is_the_workers_alone(broker: UpstreamBroker) -> None:
    assert broker.path.stat().st_mode & 0o777 == 0o600
    await broker.stop()
    assert not broker.path.exists()
