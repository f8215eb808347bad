"""Open work keeps a VM awake in every mode, with real guests: an app WebSocket through the data plane, a
shell through the control API left open with nothing typed, and an exec that prints nothing, each for
3 x idle_suspend_after, in one process and under `mvm serve --workers 2` (the host counts what it runs
itself, the edge workers report their open streams); once they end, the VM is suspended when idle as usual.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.e2e.edge_harness import CONTROL, DOMAIN, edge_config, running_edge
from tests.e2e.fleet_harness import ADMIN
from tests.e2e.test_fleet import serve_workers
from vmm.model import VmRecord, VmState
from vmm.settings import VmmSettings

IDLE = 2.0  # idle_suspend_after of the VMs here
QUIET = 3 * IDLE  # how long the shell and the exec stay quiet


@asynccontextmanager
async def _session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


class Api:
    """The control API and the VMs' host names of one mode, as `mvm shell`, `mvm exec` and a browser reach them."""

    def __init__(
        self, session: aiohttp.ClientSession, origin: Callable[[str], tuple[str, dict[str, str]]], admin: dict[str, str]
    ) -> None:
        self.session, self.origin, self.admin = session, origin, admin  # origin: host name -> (base URL, headers)

    def _control(self, path: str) -> tuple[str, dict[str, str]]:
        base, headers = self.origin(CONTROL)
        return base + path, {**headers, **self.admin}

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        url, headers = self._control(path)
        async with self.session.request(method, url, json=body, headers=headers) as r:
            assert r.status < 300, await r.text()
            return await r.json() if r.status != 204 else None

    async def state(self, vm_id: str) -> str:
        return str((await self.call("GET", f"/v1/vms/{vm_id}"))["state"])

    def shell(self, vm_id: str) -> Any:
        url, headers = self._control(f"/v1/vms/{vm_id}/shell?cols=80&rows=24")
        return self.session.ws_connect(url, headers=headers)

    async def exec(self, vm_id: str, argv: list[str]) -> list[dict[str, Any]]:
        url, headers = self._control(f"/v1/vms/{vm_id}/exec")
        async with self.session.post(url, json={"argv": argv}, headers=headers) as r:
            assert r.status == 200, await r.text()
            return [orjson.loads(line) for line in (await r.read()).splitlines() if line.strip()]

    def app_websocket(self, vm_id: str, token: str) -> Any:
        """The demo app's echo WebSocket, through the data plane."""
        base, headers = self.origin(f"{vm_id}.{DOMAIN}")
        return self.session.ws_connect(base + "/ws", headers={**headers, "Authorization": f"Bearer {token}"})


async def _stays_running(api: Api, vm_id: str, seconds: float) -> None:
    """The VM is running at every look, twice per idle period and more, for `seconds`."""
    looks = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert await api.state(vm_id) == "running", f"suspended under open work after {looks} looks"
        looks += 1
        await asyncio.sleep(0.5)
    assert looks >= 2 * seconds / IDLE


async def _until_suspended(api: Api, vm_id: str) -> None:
    async with asyncio.timeout(30):
        while await api.state(vm_id) != "suspended":
            await asyncio.sleep(0.2)


async def _open_work_keeps_it_awake(api: Api, template: str, suspends: Callable[[str], Awaitable[int]]) -> None:
    """A quiet app WebSocket, a quiet shell, then a quiet exec: never a suspend under them; after each, an idle
    suspend."""
    demo = (await api.call("POST", "/v1/vms", {"policy": {"idle_suspend_after": IDLE}}))["id"]
    token = (await api.call("POST", f"/v1/vms/{demo}/tokens", {}))["token"]
    async with api.app_websocket(demo, token) as ws:
        await ws.send_str("hello")
        assert await asyncio.wait_for(ws.receive_str(), 30) == "hello"
        await _stays_running(api, demo, QUIET)
        assert not ws.closed
        assert await suspends(demo) == 0
    await _until_suspended(api, demo)
    await api.call("DELETE", f"/v1/vms/{demo}")

    vm_id = (await api.call("POST", "/v1/vms", {"template": template, "policy": {"idle_suspend_after": IDLE}}))["id"]
    async with api.shell(vm_id) as ws:
        first = await asyncio.wait_for(ws.receive(), 30)  # the prompt: the shell is up
        assert first.type == aiohttp.WSMsgType.BINARY, first
        await _stays_running(api, vm_id, QUIET)
        assert not ws.closed
        assert await suspends(vm_id) == 0
    await _until_suspended(api, vm_id)
    assert await suspends(vm_id) == 1, "idle once the shell closed"

    quiet = asyncio.create_task(api.exec(vm_id, ["sleep", str(QUIET + 2)]))  # wakes it, prints nothing
    async with asyncio.timeout(30):
        while await api.state(vm_id) != "running":
            await asyncio.sleep(0.1)
    await _stays_running(api, vm_id, QUIET)
    assert (await quiet)[-1] == {"exit_code": 0}
    assert await suspends(vm_id) == 1
    await _until_suspended(api, vm_id)
    await api.call("DELETE", f"/v1/vms/{vm_id}")


async def test_open_work_keeps_the_vm_awake_in_one_process(
    settings: VmmSettings, sandbox_template: str
) -> None:
    cfg = edge_config(settings)
    async with running_edge(cfg) as client:
        states: list[tuple[str, VmState]] = []  # every notified change, as it was then

        def changed(rec: VmRecord) -> None:
            states.append((rec.id, rec.state))

        client.edge.manager.listeners.append(changed)

        async def suspends(vm_id: str) -> int:
            """Moves into `suspended` (a record is notified more than once per state)."""
            mine = [state for vm, state in states if vm == vm_id]
            return sum(1 for before, now in itertools.pairwise(mine) if now is VmState.SUSPENDED and before is not now)

        api = Api(client.session, lambda name: (f"https://{name}:{client.edge.port}", {}), client.admin)
        await _open_work_keeps_it_awake(api, sandbox_template, suspends)


async def test_open_work_keeps_the_vm_awake_with_edge_workers(
    settings: VmmSettings, sandbox_template: str, tmp_path: Path
) -> None:
    async with serve_workers(settings, tmp_path) as (serve, client), _session() as session:

        async def suspends(vm_id: str) -> int:
            return serve.events("vm.suspended", vm_id)

        origin = f"http://127.0.0.1:{client.port}"
        api = Api(session, lambda name: (origin, {"Host": name}), {"Authorization": f"Bearer {ADMIN}"})
        await _open_work_keeps_it_awake(api, sandbox_template, suspends)
