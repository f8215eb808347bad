"""Mutual TLS in a fleet with a real guest: one `mvm host` and two `mvm edge`s (through the data port, as
from another machine), their certificates from two CAs during a rotation; and `mvm serve` on TLS.

The host trusts an old and a new CA; edge "old" has a certificate of the old CA, edge "new" one of
the new. Both are served; a client with no certificate or with one of a third CA is refused by the
host API and the data port; once the host's files move to the new CA alone and it has reloaded them,
edge "old" is refused and edge "new" still reaches its VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from fleet import cluster_ca
from fleet.data_port import request_line
from tests.e2e.conftest import REPO
from tests.e2e.fleet_harness import EdgeClient, Role, free_port, toml
from tests.e2e.test_fleet import serve_workers
from vmm.settings import VmmSettings

FAST = {"heartbeat_interval": 0.3, "down_after": 2.0}
SECRET = "mtls-test-cluster-secret-0123456789abcdef"


@dataclass
class TlsFleet:
    host: Role
    edges: dict[str, EdgeClient]  # "old", "new": by the CA of their certificate
    cas: dict[str, Path]  # "old", "new", "stranger": folders of ca.crt/ca.key
    files: Path  # the host's cluster files


def _trust(path: Path, *cas: Path) -> Path:
    """Written aside and renamed over, as a rotation should: the watcher never reads half a file."""
    aside = path.with_suffix(".new")
    aside.write_bytes(b"".join((ca / "ca.crt").read_bytes() for ca in cas))
    aside.rename(path)
    return path


def _events(role: Role, name: str) -> list[dict[str, object]]:
    found = []
    for line in role.log.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            event = orjson.loads(line)
            if isinstance(event, dict) and event.get("event") == name:
                found.append(event)
    return found


@pytest.fixture
async def tls_fleet(settings: VmmSettings, tmp_path: Path) -> AsyncIterator[TlsFleet]:
    cas = {name: tmp_path / name for name in ("old", "new", "stranger")}
    for name, folder in cas.items():
        cluster_ca.init_ca(folder, name=f"{name} CA")
    files = tmp_path / "host-files"
    cluster_ca.issue(cas["old"], "host", "h1", files, cluster_ca.LOOPBACK, stem="host")
    common = {"vmm": {"state_dir": str(settings.state_dir)}}  # the host's SQLite catalog, shared with its edges
    host_config = tmp_path / "h1.toml"
    host_config.write_text(toml({**common,
        "cluster": {"tls": True, "secret": SECRET, "host_id": "h1", "host_listen": "127.0.0.1:0",
                    "data_listen": "127.0.0.1:0", "ca_file": str(_trust(files / "ca.pem", cas["old"], cas["new"])),
                    "host_cert": str(files / "host.crt"), "host_key": str(files / "host.key"), **FAST},
        "reaper": {"interval": 0.2},
    }))  # fmt: skip
    host = Role("h1", ["host"], host_config, tmp_path / "h1.log")
    edges, clients = [], {}
    for name in ("old", "new"):
        cert, key = cluster_ca.issue(cas[name], "edge", f"edge-{name}", tmp_path / f"edge-{name}")
        port = free_port()
        config = tmp_path / f"edge-{name}.toml"
        config.write_text(toml({**common,
            "server": {"listen_port": port, "tls": False},
            "cluster": {"tls": True, "secret": SECRET, "direct": False, "edge_cert": str(cert), "edge_key": str(key),
                        "ca_file": str(_trust(tmp_path / f"edge-{name}" / "ca.pem", cas["old"], cas["new"])), **FAST},
        }))  # fmt: skip
        edges.append(Role(f"edge-{name}", ["edge", "--worker"], config, tmp_path / f"edge-{name}.log"))
        clients[name] = EdgeClient(port)
    try:
        for role in [host, *edges]:
            await role.start()
        for client in clients.values():
            await client.until_up()
            async with asyncio.timeout(60):
                while not [h for h in (await client.api("GET", "/v1/hosts"))["hosts"] if h["up"]]:
                    await asyncio.sleep(0.2)
        yield TlsFleet(host, clients, cas, files)
    finally:
        for role in [*edges, host]:
            await role.stop()


def _client_context(trust: list[Path], cert_from: Path | None, tmp: Path) -> ssl.SSLContext:
    """A client that trusts the CAs `trust` and presents an edge certificate of `cert_from` (None: none)."""
    ctx = ssl.create_default_context(cadata="".join((ca / "ca.crt").read_text() for ca in trust))
    if cert_from is not None:
        ctx.load_cert_chain(*cluster_ca.issue(cert_from, "edge", f"probe-{cert_from.name}", tmp / "probes"))
    return ctx


async def _answer(port: int, ctx: ssl.SSLContext, request: bytes) -> bytes:
    """What the host answers to one request over TLS; b"" when it refuses (an alert, or it hangs up)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1")
    except (ssl.SSLError, ConnectionError):
        return b""
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(200), 30)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()


async def test_mutual_tls_refuses_strangers_and_rotates_without_a_stop(tls_fleet: TlsFleet, tmp_path: Path) -> None:
    old, new = tls_fleet.edges["old"], tls_fleet.edges["new"]
    vm = await old.api("POST", "/v1/vms", {"policy": {"idle_suspend_after": 600}}, status=201)
    token = (await old.api("POST", f"/v1/vms/{vm['id']}/tokens", {}, status=201))["token"]
    assert await old.counter(vm["id"], token) == 1, "through the host API and the data port, both mutual TLS"
    assert await new.counter(vm["id"], token) == 2, "an edge of the other CA of the overlap"

    started = _events(tls_fleet.host, "host.started")[-1]
    api_port, data_port = int(str(started["api"]).rpartition(":")[2]), int(str(started["data_port"]))
    api_request = f"GET /v1/host HTTP/1.1\r\nHost: h1\r\nAuthorization: Bearer {SECRET}\r\n\r\n".encode()
    tunnel_request = request_line(SECRET, vm["id"], 8081)
    cas = tls_fleet.cas
    both = [cas["old"], cas["new"]]
    old_member, new_member = _client_context(both, cas["old"], tmp_path), _client_context(both, cas["new"], tmp_path)
    for member in (old_member, new_member):
        assert (await _answer(api_port, member, api_request)).startswith(b"HTTP/1.1 200")
        assert (await _answer(data_port, member, tunnel_request)).startswith(b"OK")
    for stranger in (_client_context(both, None, tmp_path), _client_context(both, cas["stranger"], tmp_path)):
        for port, request in ((api_port, api_request), (data_port, tunnel_request)):
            assert await _answer(port, stranger, request) == b"", "no certificate, or one of another CA: refused"

    # Rotation: the host takes a certificate of the new CA, then trusts the new CA alone.
    cluster_ca.issue(cas["new"], "host", "h1", tmp_path / "host-next", cluster_ca.LOOPBACK, stem="host")
    for name in ("host.key", "host.crt"):
        (tmp_path / "host-next" / name).rename(tls_fleet.files / name)
    _trust(tls_fleet.files / "ca.pem", cas["new"])
    async with asyncio.timeout(30):  # the files are re-read when they change (a look every second)
        while ["CN=new CA"] not in [e["cas"] for e in _events(tls_fleet.host, "cluster.tls_reloaded")]:
            await asyncio.sleep(0.1)
    assert await new.counter(vm["id"], token) == 3, "the new CA's edge is served on"
    status, _, body = await old.vm_get(vm["id"], token)
    assert status != 200, (status, body)  # its tunnels are cut and a new one is refused
    refused = await old.request("api.mvm.localhost", "POST", f"/v1/vms/{vm['id']}/suspend",
                                "Authorization: Bearer dev-admin-key-change-me\r\n")  # fmt: skip
    assert refused[0] in (403, 503), refused  # 403: its open connection; 503: a new one fails the handshake
    assert (await _answer(api_port, old_member, api_request)) == b"", "a member of the dropped CA is refused"
    assert (await _answer(data_port, old_member, tunnel_request)) == b""
    assert (await _answer(api_port, new_member, api_request)).startswith(b"HTTP/1.1 200")
    assert await new.counter(vm["id"], token) == 4, "the VM ran on, untouched by the refused edge"
    await new.api("DELETE", f"/v1/vms/{vm['id']}", status=204)


async def test_one_machine_serves_over_mutual_tls(settings: VmmSettings, tmp_path: Path) -> None:
    """`mvm serve --workers 2` with the files of `mvm cluster init`: its host and workers use their own roles',
    and the unprivileged workers take a rotated edge certificate without a stop."""
    init = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mvm.cli", "cluster", "init", "--dir", str(tmp_path / "cluster"), cwd=REPO,
    )  # fmt: skip
    assert await init.wait() == 0
    files = {key: str(tmp_path / "cluster" / name) for key, name in (
        ("ca_file", "ca.crt"), ("host_cert", "host.crt"), ("host_key", "host.key"),
        ("edge_cert", "edge.crt"), ("edge_key", "edge.key"),
    )}  # fmt: skip
    cluster = {"tls": True, "host_listen": "127.0.0.1:0", "data_listen": "127.0.0.1:0", **FAST, **files}
    async with serve_workers(settings, tmp_path, cluster=cluster) as (serve, client):
        assert _events(serve, "host.started")[-1]["tls"] is True
        vm = await client.api("POST", "/v1/vms", {}, status=201)
        token = (await client.api("POST", f"/v1/vms/{vm['id']}/tokens", {}, status=201))["token"]
        assert await client.counter(vm["id"], token) == 1
        # A new edge certificate while the set runs: the workers gave up root, and the key file is root's
        # (0600), so they read the supervisor's copies of it (fleet/tls_mirror.py) and take it without a stop.
        cluster_ca.issue(tmp_path / "cluster", "edge", "edge-next", tmp_path / "edge-next", stem="edge")
        for name in ("edge.key", "edge.crt"):
            (tmp_path / "edge-next" / name).rename(tmp_path / "cluster" / name)
        async with asyncio.timeout(30):
            while len([e for e in _events(serve, "cluster.tls_reloaded") if e["role"] == "edge"]) < 2:
                await asyncio.sleep(0.1)
        assert not _events(serve, "cluster.tls_reload_failed")
        assert await client.counter(vm["id"], token) == 2, "the workers reach the host with the new certificate"
        await client.api("DELETE", f"/v1/vms/{vm['id']}", status=204)
