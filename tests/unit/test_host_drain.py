"""A stopping host's data port: no new tunnel, those in flight finish within the drain, the rest are cut.

The guest is a local TCP server that answers each tunnel when the test says so (netns.connect_guest
is pointed at it): the order of events is set by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from fleet import data_port
from fleet.data_port import DataPort, open_tunnel
from vmm.errors import VmFailed

SECRET = "s" * 40


async def test_a_stopping_data_port_lets_tunnels_in_flight_finish_and_cuts_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers: dict[bytes, asyncio.Event] = {b"fast": asyncio.Event(), b"slow": asyncio.Event()}

    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name = (await reader.readline()).strip()
        await answers[name].wait()
        writer.write(b"answer for " + name + b"\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(guest, "127.0.0.1", 0)
    guest_port = server.sockets[0].getsockname()[1]

    async def connect_guest(vm_id: str, port: int, timeout: float) -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", guest_port))
        return sock

    monkeypatch.setattr(data_port.netns, "connect_guest", connect_guest)
    port = DataPort(SECRET, lambda vm_id, p: True)
    await port.start("127.0.0.1", 0)
    address = f"127.0.0.1:{port.port}"
    streams = {}
    for name in answers:
        sock = await open_tunnel(address, SECRET, "vabc", 8080, 5.0)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(name + b"\n")
        await writer.drain()
        streams[name] = reader, writer
    try:
        stopping = asyncio.create_task(port.stop(drain=3.0))
        await asyncio.sleep(0)  # let it close the listener
        with pytest.raises(VmFailed):
            await open_tunnel(address, SECRET, "vabc", 8080, 5.0)
        answers[b"fast"].set()  # in flight when the stop began: it finishes
        assert await asyncio.wait_for(streams[b"fast"][0].readline(), 10) == b"answer for fast\n"
        streams[b"fast"][1].close()  # the edge is done with it (its answer ended)
        assert await asyncio.wait_for(stopping, 10) == 1, "the one still open at the end of the drain was cut"
        assert await asyncio.wait_for(streams[b"slow"][0].read(), 10) == b""
    finally:
        answers[b"slow"].set()
        for _, writer in streams.values():
            writer.close()
        server.close()
        await server.wait_closed()
