"""Open work: one count per VM that the reaper reads, fed by holders in the process and by edges' reports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from edge.control import SERVER, errors_and_auth
from fleet.catalog import Capacity, HostRecord, PlacedVm
from fleet.host import activity
from fleet.move_api import HOST_MANAGER
from fleet.remote_backend import OPEN_LEASE, RemoteBackend
from mvm.config import load_config
from vmm.errors import NotFound
from vmm.manager import VmManager
from vmm.model import VmRecord, VmState
from vmm.open_work import MAX_LEASE, OpenWork
from vmm.policy import Policy
from vmm.reaper import Reaper

VM, OTHER = "vaaaaaaaaaaa", "vbbbbbbbbbbb"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_holds_count_while_open_and_leave_no_key_behind() -> None:
    work = OpenWork()
    with work.hold(VM):
        with work.hold(VM):
            work.opened(OTHER)
            assert work == {VM: 2, OTHER: 1}
        assert work[VM] == 1
        work.closed(OTHER)
    assert work == {} and work.get(VM, 0) == 0 and len(work) == 0
    with pytest.raises(RuntimeError), work.hold(VM):
        raise RuntimeError("the exec failed")
    assert work == {}, "a hold ends however its block ends"


def test_reports_add_to_local_holds_replace_each_other_and_expire() -> None:
    clock = Clock()
    work = OpenWork(clock)
    work.opened(VM)
    work.report("edge-a", {VM: 2, OTHER: 0}, lease=5.0)
    work.report("edge-b", {VM: 1, OTHER: 3}, lease=5.0)
    assert work == {VM: 4, OTHER: 3}
    work.report("edge-a", {VM: 1}, lease=5.0)  # a new batch replaces the last one, it does not add to it
    assert work == {VM: 3, OTHER: 3}
    work.report("edge-b", {}, lease=5.0)  # its streams ended
    assert work == {VM: 2}
    clock.now += 5.0  # edge-a sent nothing for its whole lease: it crashed, or lost this host
    assert work == {VM: 1}
    work.report("edge-c", {OTHER: 1}, lease=10 * MAX_LEASE)
    clock.now += MAX_LEASE
    assert work == {VM: 1}, "no report is believed for longer than MAX_LEASE"


class _Vms:
    """The reaper's view of a VM manager: one VM, idle for long, its open work in an OpenWork."""

    def __init__(self, work: OpenWork) -> None:
        self.open_work = work
        self.rec = VmRecord(VM, "demo", VmState.RUNNING, Policy(idle_suspend_after=2.0), 8080, time.time(), 0.0)
        self.suspended = 0
        self.traffic_age: float | None = None  # what the guest's namespace says (None: no connection)

    def list_vms(self) -> list[VmRecord]:
        return [self.rec]

    def busy_count(self, vm_id: str) -> int:
        return self.open_work.get(vm_id, 0)

    def touch(self, vm_id: str, at: float | None = None) -> None:
        self.rec.last_activity = max(self.rec.last_activity, time.time() if at is None else at)

    async def guest_traffic_age(self, vm_id: str) -> float | None:
        return self.traffic_age

    async def pause(self, vm_id: str) -> VmRecord:
        raise AssertionError("no pause policy here")

    async def suspend(self, vm_id: str, reason: str | None = None) -> VmRecord:
        self.suspended += 1
        self.rec.state = VmState.SUSPENDED
        return self.rec

    async def delete(self, vm_id: str, reason: str = "") -> None:
        raise AssertionError("nothing is due for deletion here")


async def test_the_reaper_waits_for_open_work_held_here_or_reported() -> None:
    clock = Clock()
    vms = _Vms(OpenWork(clock))
    reaper = Reaper(vms, interval=60.0)
    with vms.open_work.hold(VM):
        await reaper.reap_once()
    vms.open_work.report("edge-a", {VM: 1}, lease=3.0)
    vms.rec.last_activity = 0.0
    await reaper.reap_once()
    assert vms.suspended == 0 and vms.rec.last_activity > 0, "open work counts as activity while it lasts"
    clock.now += 3.0  # the edge's report expired
    vms.rec.last_activity = 0.0
    await reaper.reap_once()
    assert vms.suspended == 1


class _HostManager:
    """What the host's activity endpoint touches."""

    def __init__(self, clock: Clock) -> None:
        self.open_work = OpenWork(clock)
        self.touched: dict[str, float] = {}

    def touch(self, vm_id: str, at: float | None = None) -> None:
        self.touched[vm_id] = time.time() if at is None else at


@pytest.fixture
async def host_api() -> AsyncIterator[tuple[TestClient[Any, Any], _HostManager, Clock]]:
    cfg = load_config(None)
    clock = Clock()
    manager = _HostManager(clock)
    app = web.Application(middlewares=[errors_and_auth])
    app[SERVER], app[HOST_MANAGER] = cfg.server, cast(VmManager, manager)
    app.router.add_post("/v1/host/activity", activity)
    async with TestClient(TestServer(app), headers={"Authorization": f"Bearer {cfg.server.admin_key}"}) as client:
        yield client, manager, clock


async def test_the_host_counts_an_edges_open_streams_until_its_lease_ends(
    host_api: tuple[TestClient[Any, Any], _HostManager, Clock],
) -> None:
    client, manager, clock = host_api
    batch = {"vms": {VM: 5.0}, "open": {VM: 2}, "edge": "edge-a", "lease": 4.0}
    assert (await client.post("/v1/host/activity", json=batch)).status == 204
    assert manager.touched == {VM: 5.0} and manager.open_work == {VM: 2}
    assert (await client.post("/v1/host/activity", json={"vms": {}, "edge": "edge-a"})).status == 204
    assert manager.open_work == {}, "a batch without open streams ends that edge's"
    assert (await client.post("/v1/host/activity", json=batch)).status == 204
    clock.now += 4.0
    assert manager.open_work == {}
    assert (await client.post("/v1/host/activity", json={"vms": {VM: 6.0}})).status == 204  # an edge of before


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ([], "the body"),
        ({"vms": {VM: "now"}}, "vms"),
        ({"vms": {}, "open": {VM: -1}, "edge": "e", "lease": 1}, "open"),
        ({"vms": {}, "open": {VM: True}, "edge": "e", "lease": 1}, "open"),
        ({"vms": {}, "open": {VM: 1}, "lease": 1}, "edge"),
        ({"vms": {}, "open": {VM: 1}, "edge": "e"}, "lease"),
        ({"vms": {}, "open": {VM: 1}, "edge": "e", "lease": MAX_LEASE + 1}, "lease"),
    ],
)
async def test_a_malformed_batch_is_refused_naming_the_field(
    host_api: tuple[TestClient[Any, Any], _HostManager, Clock], body: Any, named: str
) -> None:
    client, manager, _ = host_api
    resp = await client.post("/v1/host/activity", json=body)
    assert resp.status == 422 and (await resp.json())["message"].startswith(named)
    assert manager.open_work == {}


class _Routes:
    """Two VMs, each on its own host, both hosts up."""

    def __init__(self) -> None:
        rec = VmRecord(VM, "demo", VmState.RUNNING, Policy(), 8080, 1.0, 1.0)
        self.vms = {VM: PlacedVm("h1", rec), OTHER: PlacedVm("h2", replace(rec, id=OTHER))}

    def placed(self, vm_id: str) -> PlacedVm | None:
        return self.vms.get(vm_id)

    def host(self, host_id: str) -> HostRecord:
        return HostRecord(host_id, f"http://{host_id}:1 {host_id}:2", Capacity(1, 1, 1), time.time(), True)

    def host_up(self, host_id: str) -> bool:
        return True


class _Hosts:
    def __init__(self) -> None:
        self.batches: list[tuple[str, dict[str, Any]]] = []

    async def call(self, host_id: str, address: str, method: str, path: str, body: Any = None) -> None:
        assert (method, path) == ("POST", "/v1/host/activity")
        self.batches.append((host_id, body))
        if host_id == "h2":
            raise NotFound("h2 lost this batch")


async def test_an_edge_reports_its_open_streams_to_each_vms_host_and_when_they_end() -> None:
    hosts = _Hosts()
    backend = RemoteBackend(_Routes(), hosts, "s" * 40)  # type: ignore[arg-type]
    streams = OpenWork()
    backend.open_streams = streams
    streams.opened(VM)
    streams.opened(VM)
    streams.opened(OTHER)
    await backend.flush_activity()
    sent = dict(hosts.batches)
    assert sent["h1"]["open"] == {VM: 2} and sent["h2"]["open"] == {OTHER: 1}
    assert sent["h1"]["edge"] == backend.edge_id and sent["h1"]["lease"] == OPEN_LEASE
    assert set(sent["h1"]["vms"]) == {VM}, "an open stream is activity too"

    hosts.batches.clear()
    streams.closed(OTHER)
    await backend.flush_activity()
    sent = dict(hosts.batches)
    assert sent["h1"]["open"] == {VM: 2}
    assert sent["h2"] == {"vms": {}, "open": {}, "edge": backend.edge_id, "lease": OPEN_LEASE}, "told they ended"

    hosts.batches.clear()
    streams.closed(VM)
    streams.closed(VM)
    await backend.flush_activity()
    assert [(h, b["open"]) for h, b in hosts.batches] == [("h1", {})]
    hosts.batches.clear()
    await backend.flush_activity()
    assert hosts.batches == [], "nothing to say: no batch"


class _OneVmRoutes:
    """VM on host h1, whose API is `address`."""

    def __init__(self, address: str) -> None:
        self.h1 = HostRecord("h1", address, Capacity(1, 1, 1), time.time(), True)
        self.vm = PlacedVm("h1", VmRecord(VM, "demo", VmState.RUNNING, Policy(), 8080, 1.0, 1.0))

    def placed(self, vm_id: str) -> PlacedVm | None:
        return self.vm if vm_id == VM else None

    def reachable_host(self, placed: PlacedVm) -> HostRecord:
        return self.h1


async def test_a_forwarded_exec_lasts_as_long_as_the_hosts_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exec through an edge worker is not cut by the host client's total timeout (the host would
    then kill the command and its open work would end with it)."""
    from edge.metrics import Metrics
    from edge.tokens import TokenService
    from fleet import host_client
    from fleet.edge_control import build_edge_control_app
    from fleet.host_client import HostClient

    monkeypatch.setattr(host_client, "TIMEOUT", aiohttp.ClientTimeout(total=0.2, connect=5))

    async def quiet_exec(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await asyncio.sleep(0.6)  # a command that prints nothing for a while
        await response.write(b'{"exit_code": 0}\n')
        await response.write_eof()
        return response

    host_app = web.Application()
    host_app.router.add_post("/v1/vms/{vm_id}/exec", quiet_exec)
    async with TestServer(host_app) as host:
        cfg = load_config(None)
        hosts = HostClient("s" * 40)
        routes = _OneVmRoutes(f"http://127.0.0.1:{host.port} 127.0.0.1:1")
        app = build_edge_control_app(cfg, routes, hosts, cast(TokenService, None), Metrics())  # type: ignore[arg-type]
        try:
            async with TestClient(TestServer(app)) as edge:
                auth = {"Authorization": f"Bearer {cfg.server.admin_key}"}
                async with asyncio.timeout(5):  # cut, the stream would never end
                    resp = await edge.post(f"/v1/vms/{VM}/exec", json={"argv": ["sleep", "1"]}, headers=auth)
                    assert resp.status == 200 and await resp.read() == b'{"exit_code": 0}\n'
        finally:
            await hosts.close()


async def test_bytes_the_guest_saw_a_moment_ago_hold_off_an_idle_suspend() -> None:
    """A request through an edge in another process reaches the guest before the edge's next batch
    reaches the host: the guest's namespace has seen it, and the reaper asks it before suspending."""
    vms = _Vms(OpenWork(Clock()))
    reaper = Reaper(vms, interval=60.0)
    vms.traffic_age = 0.5
    await reaper.reap_once()
    assert vms.suspended == 0 and vms.rec.last_activity > time.time() - 1.0
    vms.rec.last_activity, vms.traffic_age = 0.0, 5.0  # only old connections (an idle pool) are left
    await reaper.reap_once()
    assert vms.suspended == 1
