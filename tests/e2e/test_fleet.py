"""A fleet on this machine with real guests: two `mvm host`s and two `mvm edge`s on a real PostgreSQL,
and `mvm serve --workers 2` (one host, two edge workers) on the embedded SQLite catalog.
"""

from __future__ import annotations

import asyncio
import base64
import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
import pytest

from fleet.host import host_id_of
from mvm.config import load_config
from tests.e2e.conftest import BOOT_TIMEOUT, IMAGES
from tests.e2e.fleet_harness import ADMIN, DOMAIN, EdgeClient, Role, free_port, toml
from tests.e2e.guest import sandbox_run
from tests.pg import PgCluster, create_database, drop_database
from vmm.accel import choose
from vmm.settings import VmmSettings
from vmm.template import create as create_template

FAST = {"heartbeat_interval": 0.3, "down_after": 2.0}
HOST = host_id_of(load_config(None))  # the id `mvm serve`'s host takes: this machine's name


@dataclass
class Fleet:
    hosts: dict[str, Role]
    edges: list[Role]
    clients: list[EdgeClient]


def _state_dir(settings: VmmSettings, name: str) -> Path:
    """A host's own state dir, sharing the session's images and templates (read-only)."""
    state = settings.state_dir / name
    state.mkdir(mode=0o700)  # the jail refuses a state dir others can read
    for shared in ("images", "templates"):
        (state / shared).symlink_to((settings.state_dir / shared).resolve())
    return state


@pytest.fixture
async def pg_fleet(settings: VmmSettings, pg_cluster: PgCluster, tmp_path: Path) -> AsyncIterator[Fleet]:
    url = await create_database(pg_cluster)
    hosts: dict[str, Role] = {}
    for name in ("h1", "h2"):
        config = tmp_path / f"{name}.toml"
        config.write_text(toml({
            "vmm": {"state_dir": str(_state_dir(settings, name))},
            "catalog": {"url": url},
            "cluster": {"host_id": name, "host_listen": "127.0.0.1:0",
                        "data_listen": "127.0.0.1:0", **FAST},
            "reaper": {"interval": 0.2},
        }))  # fmt: skip
        hosts[name] = Role(name, ["host"], config, tmp_path / f"{name}.log")
    edges, clients = [], []
    for name, direct in (("edge-a", True), ("edge-b", False)):  # B goes through the hosts' data ports, as
        port = free_port()  # an edge on another machine would
        config = tmp_path / f"{name}.toml"
        config.write_text(toml({
            "server": {"listen_port": port, "tls": False},
            "vmm": {"state_dir": str(tmp_path / name)},
            "catalog": {"url": url},
            "cluster": {**FAST, "direct": direct},
        }))  # fmt: skip
        edges.append(Role(name, ["edge", "--worker"], config, tmp_path / f"{name}.log"))
        clients.append(EdgeClient(port))
    try:
        for role in [*hosts.values(), *edges]:
            await role.start()
        for client in clients:
            await client.until_up()
            await _until_hosts_up(client, {"h1", "h2"})
        yield Fleet(hosts, edges, clients)
    finally:
        for role in [*edges, *hosts.values()]:
            await role.stop()
        await drop_database(pg_cluster, url)


async def _until_hosts_up(client: EdgeClient, wanted: set[str], timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while {h["id"] for h in (await client.api("GET", "/v1/hosts"))["hosts"] if h["up"]} != wanted:
            await asyncio.sleep(0.2)


async def _until_state(client: EdgeClient, vm_id: str, state: str, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while (await client.api("GET", f"/v1/vms/{vm_id}")).get("state") != state:  # a 404 has none yet
            await asyncio.sleep(0.1)


async def _one_restore_for_fifty(fleet_clients: list[EdgeClient], host: Role, vm_id: str, token: str) -> None:
    """50 concurrent requests, spread over the edges, to a suspended VM: one restore, every one answered."""
    restores = host.events("vm.restored", vm_id)
    answers = await asyncio.gather(*(fleet_clients[i % len(fleet_clients)].vm_get(vm_id, token) for i in range(50)))
    assert [status for status, _, _ in answers] == [200] * 50
    assert host.events("vm.restored", vm_id) == restores + 1, "two edges waking one VM caused one restore"


async def test_two_hosts_two_edges_on_postgresql(pg_fleet: Fleet) -> None:
    edge_a, edge_b = pg_fleet.clients
    vm = await edge_a.api("POST", "/v1/vms", {"host": "h2", "policy": {"idle_suspend_after": 2}}, status=201)
    vm_id = vm["id"]
    assert vm["host"] == "h2"
    token = (await edge_a.api("POST", f"/v1/vms/{vm_id}/tokens", {}, status=201))["token"]
    await _until_state(edge_b, vm_id, "running")  # the other edge learns of it from the catalog's change feed
    assert await edge_b.counter(vm_id, token) == 1, "reached through the other edge"
    await _until_state(edge_b, vm_id, "suspended")  # host 2's reaper
    assert await edge_a.counter(vm_id, token) == 2, "woken by a request through edge A, memory intact"

    await edge_a.api("POST", f"/v1/vms/{vm_id}/suspend", status=200)
    for edge in pg_fleet.clients:
        await _until_state(edge, vm_id, "suspended")
    await _one_restore_for_fifty(pg_fleet.clients, pg_fleet.hosts["h2"], vm_id, token)
    assert await edge_b.counter(vm_id, token) == 53

    # Host 1 dies: its VM is unavailable (503, not lost); it comes back with its host.
    other = await edge_b.api("POST", "/v1/vms", {"host": "h1", "policy": {"idle_suspend_after": 600}}, status=201)
    other_token = (await edge_b.api("POST", f"/v1/vms/{other['id']}/tokens", {}, status=201))["token"]
    await _until_state(edge_a, other["id"], "running")
    assert await edge_a.counter(other["id"], other_token) == 1
    await pg_fleet.hosts["h1"].stop(signal.SIGKILL)
    seen = 1
    async with asyncio.timeout(30):  # answered until its tunnels (or, with root, its namespace) are gone
        while (answer := await edge_a.vm_get(other["id"], other_token))[0] != 503:
            seen = orjson.loads(answer[2])["counter"]
            await asyncio.sleep(0.2)
    assert answer[1].get("retry-after"), answer
    await _until_state(edge_b, other["id"], "unavailable")  # once the host has missed its heartbeats
    # Its idle suspend (2 s) falls in that wait: waited for, so no request races the reaper.
    await _until_state(edge_b, vm_id, "suspended")
    assert await edge_b.counter(vm_id, token) == 54, "host 2's VMs are untouched"
    await pg_fleet.hosts["h1"].start()
    await _until_hosts_up(edge_a, {"h1", "h2"})
    assert await edge_a.counter(other["id"], other_token) == seen + 1, "back with its host, memory intact"

    # Templates are per host: listed with their host, and a change must name one.
    templates = {(t["name"], t["host"]) for t in (await edge_a.api("GET", "/v1/templates"))["templates"]}
    assert {("demo", "h1"), ("demo", "h2")} <= templates  # (and whatever else the session's templates hold)
    refused = await edge_a.api("POST", "/v1/templates", {"name": "x", "image": "demo"}, status=422)
    assert "?host=" in refused["message"]

    # An edge restart loses nothing: edges hold no VM state.
    await pg_fleet.edges[1].stop()
    await pg_fleet.edges[1].start()
    await edge_b.until_up()
    assert await edge_b.counter(vm_id, token) == 55
    listed = {v["id"]: v["host"] for v in (await edge_b.api("GET", "/v1/vms"))["vms"]}
    assert listed == {vm_id: "h2", other["id"]: "h1"}

    # A running VM moves with its memory, disk and device state; then host 2 is drained back to host 1.
    moved = await edge_a.api("POST", f"/v1/vms/{vm_id}/move", {"to": "h1"}, status=200)
    assert moved["host"] == "h1" and moved["state"] == "suspended"
    assert await edge_b.counter(vm_id, token) == 56, "woken on its new host"
    assert pg_fleet.hosts["h1"].events("vm.restored", vm_id) == 1
    drained = await edge_b.api("POST", "/v1/hosts/h1/drain", status=200)
    assert sorted(m["vm"] for m in drained["moved"]) == sorted([vm_id, other["id"]]) and not drained["failed"]
    listed = {v["id"]: v["host"] for v in (await edge_a.api("GET", "/v1/vms"))["vms"]}
    assert listed == {vm_id: "h2", other["id"]: "h2"}
    assert await edge_a.counter(vm_id, token) == 57
    assert await edge_b.counter(other["id"], other_token) == seen + 2

    # The fleet's one event sequence: the same at both edges, numbered without a gap (host 1's events
    # from before its SIGKILL too), each move in it as a `moved` event on the host it reached.
    async with asyncio.timeout(15):
        while True:
            feeds = [(await edge.api("GET", "/v1/events?follow=0", status=200))["events"] for edge in pg_fleet.clients]
            moves = [e["vm"] for e in feeds[0] if e["type"] == "moved"]
            if feeds[0] == feeds[1] and sorted(moves) == sorted([vm_id, vm_id, other["id"]]):
                break
            await asyncio.sleep(0.2)
    seqs = [e["seq"] for e in feeds[0]]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_checkpoints_move_with_the_vm_through_the_fleet(sandbox_template: str, pg_fleet: Fleet) -> None:
    """The edge's move (what `mvm vm move` calls) carries a VM's checkpoints: on its new host they are listed,
    and a rewind and a fork from one work there. A VM whose checkpoint a child uses stays where it is
    (the dependants rule)."""
    edge_a, edge_b = pg_fleet.clients
    vm_id = (await edge_a.api("POST", "/v1/vms", {"template": sandbox_template, "host": "h2"}, status=201))["id"]
    await sandbox_run(vm_id, "z = 'kept'; open('/data/m.txt', 'w').write('kept')")
    await edge_a.api("POST", f"/v1/vms/{vm_id}/checkpoints", {"name": "p"}, status=201)
    await sandbox_run(vm_id, "z = 'changed'; open('/data/m.txt', 'w').write('changed')")
    assert (await edge_a.api("POST", f"/v1/vms/{vm_id}/move", {"to": "h1"}, status=200))["host"] == "h1"
    listed = (await edge_b.api("GET", f"/v1/vms/{vm_id}/checkpoints", status=200))["checkpoints"]
    assert [(c["vm"], c["name"]) for c in listed] == [(vm_id, "p")]
    assert (await edge_b.api("POST", f"/v1/vms/{vm_id}/restore", {"checkpoint": "p"}, status=200))["state"] == "running"
    assert await sandbox_run(vm_id, "z, open('/data/m.txt').read()") == ("kept", "kept")
    forked = await edge_a.api("POST", f"/v1/vms/{vm_id}/fork", {"count": 1, "checkpoint": "p"}, status=201)
    # the other way to fork from it: placed on the checkpoint's host, whichever host has more room
    made = await edge_b.api("POST", "/v1/vms", {"from_checkpoint": f"{vm_id}/p"}, status=201)
    children = [forked["vms"][0]["id"], made["id"]]
    for child in children:
        await _until_state(edge_b, child, "running")
        assert (await edge_b.api("GET", f"/v1/vms/{child}"))["host"] == "h1"
        assert await sandbox_run(child, "z, open('/data/m.txt').read()") == ("kept", "kept")
    refused = await edge_a.api("POST", f"/v1/vms/{vm_id}/move", {"to": "h2"}, status=409)
    assert "in use by" in refused["message"] and all(f"VM {c}" in refused["message"] for c in children)
    for vm in (*children, vm_id):
        await edge_a.api("DELETE", f"/v1/vms/{vm}", status=204)


@asynccontextmanager
async def serve_workers(
    settings: VmmSettings, tmp_path: Path, **sections: Any
) -> AsyncIterator[tuple[Role, EdgeClient]]:
    """`mvm serve --workers 2` on the embedded SQLite catalog, until its host is up; stopped at the end,
    and its run directory gone with it. `sections` are more TOML tables, e.g. proxy={...} (server={...} adds keys)."""
    port = free_port()
    config = tmp_path / "serve.toml"
    config.write_text(toml({
        "server": {"listen_port": port, "tls": False, "workers": 2, **sections.pop("server", {})},
        "vmm": {"state_dir": str(settings.state_dir)},
        "cluster": {"host_listen": "127.0.0.1:0", "data_listen": "127.0.0.1:0", **FAST},
        "reaper": {"interval": 0.2},
        **sections,
    }))  # fmt: skip
    serve = Role("serve", ["serve"], config, tmp_path / "serve.log")
    client = EdgeClient(port)
    await serve.start()
    try:
        await client.until_up()
        await _until_hosts_up(client, {HOST})
        yield serve, client
    finally:
        await serve.stop()
    assert not list(Path("/dev/shm").glob(f"mvm-set-{serve.proc.pid if serve.proc else 0}-*")), "run dir removed"


async def test_serve_with_two_workers_on_sqlite(settings: VmmSettings, tmp_path: Path) -> None:
    async with serve_workers(settings, tmp_path) as (serve, client):
        vm = await client.api("POST", "/v1/vms", {"policy": {"idle_suspend_after": 2}}, status=201)
        token = (await client.api("POST", f"/v1/vms/{vm['id']}/tokens", {}, status=201))["token"]
        assert await client.counter(vm["id"], token) == 1
        await _until_state(client, vm["id"], "suspended")
        assert await client.counter(vm["id"], token) == 2
        await client.api("POST", f"/v1/vms/{vm['id']}/suspend", status=200)
        await _until_state(client, vm["id"], "suspended")
        await _one_restore_for_fifty([client], serve, vm["id"], token)
        await client.api("DELETE", f"/v1/vms/{vm['id']}", status=204)
        # Templates through the edge: made on the (only) host, listed with it, placeable at once.
        made = await client.api("POST", "/v1/templates", {"name": "again", "image": "demo"}, status=201)
        assert made["name"] == "again"
        listed = (await client.api("GET", "/v1/templates"))["templates"]
        assert {(t["name"], t["host"]) for t in listed} >= {("demo", HOST), ("again", HOST)}
        other = await client.api("POST", "/v1/vms", {"template": "again"}, status=201)
        await client.api("DELETE", "/v1/templates/again", status=409)  # in use
        await client.api("DELETE", f"/v1/vms/{other['id']}", status=204)
        await client.api("DELETE", "/v1/templates/again", status=204)
        await client.api("POST", "/v1/vms", {"template": "again"}, status=404)  # no host has it any more


async def test_grpc_through_edge_workers_reaches_the_h2c_port(settings: VmmSettings, tmp_path: Path) -> None:
    """An image's h2c label reaches edge workers through the catalog: a gRPC call through them is
    relayed to the guest's port over HTTP/2 (over HTTP/1.1 the guest's gRPC server would refuse it)."""
    if not (IMAGES / "grpc-app" / "image.json").exists():
        pytest.fail("guest image grpc-app missing: run scripts/install.sh (builds var/images/grpc-app)")
    name = f"grpc{uuid.uuid4().hex[:8]}"  # in the session's shared templates: a name of this test's own
    await create_template(
        replace(settings, boot_timeout=BOOT_TIMEOUT), name, "grpc-app", choose(settings.accelerator), lambda _: None
    )
    async with serve_workers(settings, tmp_path, http2={"h2c": True}) as (_, client):
        vm = await client.api("POST", "/v1/vms", {"template": name}, status=201)
        token = (await client.api("POST", f"/v1/vms/{vm['id']}/tokens", {}, status=201))["token"]
        authority = (("grpc.default_authority", f"{vm['id']}.{DOMAIN}"),)
        with grpc.insecure_channel(f"127.0.0.1:{client.port}", options=authority) as channel:  # h2c to the edge
            echo = channel.unary_unary(
                "/mvm.Demo/Echo", request_serializer=orjson.dumps, response_deserializer=orjson.loads
            )
            answer = await asyncio.to_thread(
                echo, {"hello": "fleet"}, metadata=(("authorization", f"Bearer {token}"),), timeout=120
            )
        assert answer["echo"] == {"hello": "fleet"}
        await client.api("DELETE", f"/v1/vms/{vm['id']}", status=204)
        await client.api("DELETE", f"/v1/templates/{name}", status=204)


async def test_exec_logs_and_shell_through_fleet_edges(
    settings: VmmSettings, sandbox_template: str, tmp_path: Path
) -> None:
    """The agent's endpoints are the host's: an edge worker forwards them, streams and WebSocket included."""
    async with serve_workers(settings, tmp_path) as (_, client):
        vm = await client.api("POST", "/v1/vms", {"template": sandbox_template}, status=201)
        body = orjson.dumps({"argv": ["sh", "-c", "echo from-$((6*7)); hostname"]})
        status, _, out = await client.request(
            f"api.{DOMAIN}", "POST", f"/v1/vms/{vm['id']}/exec", f"Authorization: Bearer {ADMIN}\r\n", body
        )
        events = [orjson.loads(line) for line in out.splitlines() if line.strip()]
        assert status == 200 and events[-1] == {"exit_code": 0}, out
        stdout = b"".join(base64.b64decode(e["data"]) for e in events if e.get("stream") == "stdout")
        assert b"from-42" in stdout, events
        token = (await client.api("POST", f"/v1/vms/{vm['id']}/tokens", {"scopes": ["shell"]}, status=201))["token"]
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{client.port}/.mvm/shell?cols=80&rows=24"
            headers = {"Host": f"{vm['id']}.{DOMAIN}", "Authorization": f"Bearer {token}"}
            async with session.ws_connect(url, headers=headers) as ws:
                await ws.send_bytes(b"echo shell-$((2+3)); exit 3\n")
                seen = bytearray()
                async with asyncio.timeout(30):
                    while (msg := await ws.receive()).type == aiohttp.WSMsgType.BINARY:
                        seen += msg.data
                assert b"shell-5" in seen
                assert msg.type == aiohttp.WSMsgType.TEXT and orjson.loads(msg.data) == {"exit_code": 3}
        await client.api("DELETE", f"/v1/vms/{vm['id']}", status=204)


SUSPEND_THEN_REQUEST_CYCLES = 100


async def _suspend_then_request(clients: list[EdgeClient], vm_id: str, token: str) -> None:
    """Suspend, then at once one request (GET and POST in turn, over each edge in turn): every one
    is answered 200 and runs exactly once in the guest (the demo counts both), never twice."""
    auth = f"Authorization: Bearer {token}\r\n"
    expected = await clients[0].counter(vm_id, token)
    for cycle in range(SUSPEND_THEN_REQUEST_CYCLES):
        await clients[cycle % len(clients)].api("POST", f"/v1/vms/{vm_id}/suspend", status=200)
        method = ("GET", "POST")[cycle % 2]
        client = clients[(cycle // 2) % len(clients)]
        status, _, body = await client.request(f"{vm_id}.{DOMAIN}", method, "/", auth)
        expected += 1
        assert (status, orjson.loads(body)["counter"] if status == 200 else body) == (200, expected), (cycle, method)


async def test_a_request_right_after_a_suspend_runs_once_with_workers(settings: VmmSettings, tmp_path: Path) -> None:
    async with serve_workers(settings, tmp_path) as (_, client):
        vm = await client.api("POST", "/v1/vms", {}, status=201)
        token = (await client.api("POST", f"/v1/vms/{vm['id']}/tokens", {}, status=201))["token"]
        for _ in range(4):  # both workers pool a connection to the guest
            await client.counter(vm["id"], token)
        await _suspend_then_request([client], vm["id"], token)
        await client.api("DELETE", f"/v1/vms/{vm['id']}", status=204)


async def test_a_request_right_after_a_suspend_runs_once_in_a_fleet(pg_fleet: Fleet) -> None:
    edge_a = pg_fleet.clients[0]
    vm = await edge_a.api("POST", "/v1/vms", {"host": "h2"}, status=201)
    token = (await edge_a.api("POST", f"/v1/vms/{vm['id']}/tokens", {}, status=201))["token"]
    for client in pg_fleet.clients:  # both edges pool a connection: A in the VM's namespace, B through h2's data port
        await client.counter(vm["id"], token)
    await _suspend_then_request(pg_fleet.clients, vm["id"], token)
    await edge_a.api("DELETE", f"/v1/vms/{vm['id']}", status=204)
