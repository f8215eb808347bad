"""`mvm serve` as its own process, with real guests, against clients that misbehave and a SIGTERM.

The edge runs as a subprocess (plain HTTP on 127.0.0.1) so that its memory and its exit are
its own: 500 idle keep-alive clients must not pin more guest connections than the pool
bound and its RSS must come back after they leave; a slow body is cut; a client over the
per-IP cap is refused; SIGTERM drains requests in flight, then suspends the VMs.
"""

from __future__ import annotations

import asyncio
import base64
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson

from tests.e2e.fleet_harness import DOMAIN, Role, ServedRole, free_port, toml
from tests.e2e.guest import guest_state
from tests.e2e.test_crash_safety import qemus_of
from vmm.manager import VmManager
from vmm.model import VmState
from vmm.network import netns
from vmm.settings import VmmSettings


class Served(ServedRole):
    """A running `mvm serve` in one process: the fleet harness's client, plus its process and memory."""

    async def vm_with_token(self, **policy: Any) -> tuple[str, str]:
        vm = await self.api("POST", "/v1/vms", {"policy": policy}, status=201)
        token = await self.api("POST", f"/v1/vms/{vm['id']}/tokens", {}, status=201)
        return str(vm["id"]), str(token["token"])

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("the edge has no RSS: it is gone")


@asynccontextmanager
async def served(settings: VmmSettings, tmp: Path, **proxy: Any) -> AsyncIterator[Served]:
    port = free_port()
    config = tmp / "served.toml"
    config.write_text(toml({
        # One process: the RSS measured and the exit status waited for are the edge's own.
        "server": {"listen_port": port, "tls": False, "drain_timeout": 10.0, "workers": 1},
        "proxy": proxy,
        "vmm": {"state_dir": str(settings.state_dir), "on_shutdown": "suspend"},
        "log": {"level": "warning"},
    }))  # fmt: skip
    role = Role("serve", ["serve"], config, tmp / "serve.log")
    await role.start()
    try:
        edge = Served(role, port)
        await edge.until_up()
        yield edge
    finally:
        await role.stop()


def _guest_connections(vm_id: str) -> int:
    """Established connections to the guest's app port, counted inside the VM's namespace."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns.ns_name(vm_id), "ss", "-Htn", "state", "established",
         "dst", f"{netns.GUEST_IP}:8080"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return len(out.splitlines())


async def _idle_clients(edge: Served, vm_id: str, token: str, count: int) -> list[asyncio.StreamWriter]:
    """`count` keep-alive clients that each made one request and now sit idle."""

    async def one() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        head = f"GET /healthz HTTP/1.1\r\nHost: {vm_id}.{DOMAIN}\r\nAuthorization: Bearer {token}\r\n\r\n"
        writer.write(head.encode())
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        length = int(answer.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        return writer

    writers: list[asyncio.StreamWriter] = []
    for start in range(0, count, 50):  # in waves: 2 cores also run the guest
        writers += await asyncio.gather(*(one() for _ in range(min(50, count - start))))
    return writers


async def _until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.1)


async def test_500_idle_clients_stay_within_the_pool_and_memory_comes_back(
    settings: VmmSettings, tmp_path: Path
) -> None:
    async with served(settings, tmp_path, upstream_keepalive_per_vm=32, max_connections_per_ip=1000) as edge:
        vm_id, token = await edge.vm_with_token()
        for _ in range(2):  # warm-up bursts: the allocator's and the TLS-less path's steady state
            for writer in await _idle_clients(edge, vm_id, token, 500):
                writer.close()
        await _until(lambda: _guest_connections(vm_id) <= 32)
        baseline = edge.rss()
        writers = await _idle_clients(edge, vm_id, token, 500)
        # Idle clients give their guest connection back to the pool; those past its bound are
        # closed once nobody took them again for a second (edge.upstream.SURPLUS_GRACE).
        await _until(lambda: _guest_connections(vm_id) <= 32)
        peak = edge.rss()
        for writer in writers:
            writer.close()
        await _until(lambda: edge.rss() <= baseline * 1.10)
        assert edge.rss() <= baseline * 1.10, f"RSS {baseline >> 20} -> {peak >> 20} -> {edge.rss() >> 20} MiB"


async def test_crafted_kid_slow_body_and_per_ip_cap_are_answered(settings: VmmSettings, tmp_path: Path) -> None:
    async with served(settings, tmp_path, body_timeout=2.0, max_connections_per_ip=20) as edge:
        vm_id, token = await edge.vm_with_token()
        auth = f"Authorization: Bearer {token}\r\n"
        for kid in (5, ["dev-hs256"], None):  # a header anyone can craft: answered at once, never left hanging
            header = base64.urlsafe_b64encode(orjson.dumps({"alg": "HS256", "kid": kid})).rstrip(b"=").decode()
            crafted = f"Authorization: Bearer {header}.eyJzdWIiOiJ4In0.c2ln\r\n"
            status, _, body = await edge.request(f"{vm_id}.{DOMAIN}", "GET", "/", crafted)
            assert status == 401 and orjson.loads(body)["error"] == "unauthorized", body
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        head = (f"POST /upload HTTP/1.1\r\nHost: {vm_id}.{DOMAIN}\r\nAuthorization: Bearer {token}\r\n"
                "Content-Length: 1000\r\n\r\nx")  # fmt: skip
        writer.write(head.encode())  # ... and never the other 999 bytes
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer
        held = [await asyncio.open_connection("127.0.0.1", edge.port) for _ in range(20)]  # the cap is 20
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
            refused = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            assert refused.startswith(b"HTTP/1.1 429"), refused
        finally:
            for _, w in held:
                w.close()
        async with asyncio.timeout(20):  # until the edge has seen the held connections close
            while (reply := await edge.request(f"{vm_id}.{DOMAIN}", "GET", "/", auth))[0] == 429:
                await asyncio.sleep(0.1)
        status, _, body = reply
        assert status == 200 and orjson.loads(body)["counter"] == 1, "the VM served on, untouched"


async def test_sigterm_drains_requests_in_flight_then_suspends(settings: VmmSettings, tmp_path: Path) -> None:
    async with served(settings, tmp_path) as edge:
        vm_id, token = await edge.vm_with_token()
        status, _, body = await edge.vm_get(vm_id, token)
        assert status == 200, body
        counter = orjson.loads(body)["counter"]
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(f"GET /sse?n=15&interval_ms=100 HTTP/1.1\r\nHost: {vm_id}.{DOMAIN}\r\n"
                     f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode())  # fmt: skip
        first = await asyncio.wait_for(reader.readuntil(b"data: 0\n\n"), 30)
        assert first.startswith(b"HTTP/1.1 200")
        edge.proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert b"data: 14\n\n" in rest and rest.endswith(b"0\r\n\r\n"), "the stream in flight was drained, not cut"
        assert await asyncio.wait_for(edge.proc.wait(), 60) == 0
    assert qemus_of(vm_id) == [], "on_shutdown = suspend left no VM running"
    manager = VmManager(settings)
    await manager.start()
    try:
        assert manager.get(vm_id).state is VmState.SUSPENDED
        await manager.ensure_running(vm_id)
        assert (await guest_state(vm_id))["counter"] == counter + 1
    finally:
        for rec in list(manager.list_vms()):
            await manager.delete(rec.id)
        await manager.close()
