"""Port selection by X-Mvm-Port and the mvm.port.N WebSocket subprotocol (edge/port_select.py), alone
and through the HTTP/1.1 edge: the right port, the token's ports and the allow-list, nothing left for the guest."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from edge.port_select import PortChoice, choose_port
from tests.unit.proxy_harness import VM, Edge, FakeBackend, Upstream, start_edge, start_upstream


@pytest.mark.parametrize(
    ("host", "header", "subprotocols", "expected"),
    [
        (None, None, None, PortChoice(None, None, None)),
        (None, b"3000", None, PortChoice(3000, None, None)),
        (3000, b" 3000 ", None, PortChoice(3000, None, None)),
        (None, None, b"chat, mvm.port.3000", PortChoice(3000, b"chat", None)),
        (None, None, b"mvm.port.3000", PortChoice(3000, None, b"mvm.port.3000")),
        (None, b"3000", b"a,b", PortChoice(3000, b"a,b", None)),
    ],
)
def test_choices(host: int | None, header: bytes | None, subprotocols: bytes | None, expected: PortChoice) -> None:
    assert choose_port(host, header, subprotocols) == expected


@pytest.mark.parametrize(
    ("host", "header", "subprotocols", "words"),
    [
        (None, b"0", None, "X-Mvm-Port must be"),
        (None, b"65536", None, "X-Mvm-Port must be"),
        (None, b"3000, 3001", None, "X-Mvm-Port must be"),
        (None, None, b"mvm.port.x", "mvm.port.<1-65535>"),
        (None, None, b"mvm.port.1, mvm.port.2", "mvm.port.<1-65535>"),
        (3000, b"3001", None, "3000 by the host name, 3001 by X-Mvm-Port"),
        (None, b"3000", b"mvm.port.3001", "two ports"),
    ],
)
def test_refusals(host: int | None, header: bytes | None, subprotocols: bytes | None, words: str) -> None:
    why = choose_port(host, header, subprotocols)
    assert isinstance(why, str) and words in why


class PortsBackend(FakeBackend):
    """Records the guest port of every upstream connection it opens."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[int] = []

    async def open_upstream(self, vm_id: str, port: int, timeout: float) -> socket.socket:
        self.ports.append(port)
        return await super().open_upstream(vm_id, port, timeout)


@pytest.fixture
async def two_ports(upstream: Upstream) -> AsyncIterator[tuple[Edge, PortsBackend]]:
    """VM's app port 8080 is `upstream`; its allowed port 3000 is another app."""
    other = await start_upstream()
    backend = PortsBackend()
    backend.add_vm(VM, upstream.port, ports=(3000,))
    backend.targets[(VM, 3000)] = other.port
    edge = await start_edge(backend)
    yield edge, backend
    await edge.close()
    await other.runner.cleanup()


def _seen(doc: dict) -> dict[str, str]:
    return {k.lower(): v for k, v in doc["headers"]}


async def test_header_and_subprotocol_pick_the_port_and_never_reach_the_guest(
    two_ports: tuple[Edge, PortsBackend],
) -> None:
    edge, backend = two_ports
    c = await edge.connect()
    auth = {"Authorization": f"Bearer {edge.token()}"}
    resp = await c.get("/echo", edge.host(), {**auth, "X-Mvm-Port": "3000"})
    assert resp.status == 200
    assert "x-mvm-port" not in _seen(resp.json()) and backend.ports == [3000]
    resp = await c.get("/echo", edge.host(), {**auth, "Sec-WebSocket-Protocol": "chat, mvm.port.8080"})
    assert _seen(resp.json())["sec-websocket-protocol"] == "chat" and backend.ports == [3000, 8080]

    for headers, status in (({"X-Mvm-Port": "9999"}, 403), ({"X-Mvm-Port": "abc"}, 400)):
        resp = await c.get("/echo", edge.host(), {**auth, **headers})
        assert resp.status == status and resp.header("Content-Type") == "application/json"
    only_app = edge.tokens.issue(VM, 300, None, "8080")[0]
    resp = await c.get("/echo", edge.host(), {"Authorization": f"Bearer {only_app}", "X-Mvm-Port": "3000"})
    assert resp.status == 403 and "does not open port 3000" in resp.json()["message"]
    c.close()


async def test_websocket_subprotocol_alone_is_answered_by_the_edge(two_ports: tuple[Edge, PortsBackend]) -> None:
    edge, backend = two_ports
    async with aiohttp.ClientSession() as session:
        headers = {"Host": edge.host(), "Authorization": f"Bearer {edge.token()}"}
        url = f"http://127.0.0.1:{edge.port}/ws"
        async with session.ws_connect(url, headers=headers, protocols=("mvm.port.3000",)) as ws:
            assert ws.protocol == "mvm.port.3000"
            await ws.send_str("hi")
            assert (await ws.receive(timeout=5)).data == "echo:hi"
    assert backend.ports == [3000]
