"""Egress through the edge's per-VM proxy, from a real guest: allowed, denied, logged and counted.

The target is a server of the test's on 127.0.0.1, which the VM's policy allow-lists; the
guest reaches it only through the proxy listening at 10.77.0.1:3128 inside its namespace.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tests.e2e.edge_harness import DOMAIN, Client, bearer, edge_config, running_edge
from vmm.settings import VmmSettings

# Code the sandbox runs: one plain HTTP GET and one CONNECT tunnel through $HTTP_PROXY, whatever NO_PROXY says.
FETCH = """
import http.client, os, urllib.error, urllib.request
proxy = os.environ["HTTP_PROXY"]
os.environ.pop("NO_PROXY"), os.environ.pop("no_proxy")  # the target is the host's 127.0.0.1, not the guest's
def plain(url):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
    try:
        return opener.open(url, timeout=10).read().decode()
    except urllib.error.HTTPError as e:
        return e.code
def tunnel(host, port):
    conn = http.client.HTTPConnection("10.77.0.1", 3128, timeout=10)
    conn.set_tunnel(host, port)
    try:
        conn.request("GET", "/tunnelled")
        return conn.getresponse().read().decode()
    except OSError as e:
        return str(e)
"""


@pytest.fixture
async def host_service() -> AsyncIterator[int]:
    """A tiny HTTP server on 127.0.0.1 (an ephemeral port): what the guest may reach."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from the host: {request.path}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def _run(client: Client, vm_id: str, token: str, code: str) -> object:
    async with client.session.post(client.vm_url(vm_id, "/run"), json={"code": code}, headers=bearer(token)) as resp:
        result = await resp.json()
    assert resp.status == 200 and result["error"] is None, result
    return result["result"]


async def _metric(client: Client, decision: str) -> float:
    async with client.session.get(client.base.format(host=f"api.{DOMAIN}") + "/metrics") as resp:
        text = await resp.text()
    name = f'mvm_egress_attempts_total{{decision="{decision}"}}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def test_egress_allowed_and_denied_by_policy(
    settings: VmmSettings, sandbox_template: str, host_service: int
) -> None:
    async with running_edge(edge_config(settings)) as client:
        policy = {"egress": [f"127.0.0.1:{host_service}"]}
        vm = await client.api("POST", "/v1/vms", {"template": sandbox_template, "policy": policy}, status=201)
        closed = await client.api("POST", "/v1/vms", {"template": sandbox_template}, status=201)
        assert vm["policy"]["egress"] == [f"127.0.0.1:{host_service}"] and closed["policy"]["egress"] == "none"
        token, closed_token = await client.token(vm["id"]), await client.token(closed["id"])
        allowed_before, denied_before = await _metric(client, "allowed"), await _metric(client, "denied")

        assert await _run(client, vm["id"], token, FETCH + "os.environ['HTTP_PROXY']") == "'http://10.77.0.1:3128'"
        got = await _run(client, vm["id"], token, f"plain('http://127.0.0.1:{host_service}/plain')")
        assert got == "'hello from the host: /plain'"
        got = await _run(client, vm["id"], token, f"tunnel('127.0.0.1', {host_service})")
        assert got == "'hello from the host: /tunnelled'"
        assert await _run(client, vm["id"], token, f"plain('http://127.0.0.1:{host_service + 1}/')") == "403"
        assert "403" in str(await _run(client, vm["id"], token, f"tunnel('127.0.0.1', {host_service + 1})"))

        await _run(client, closed["id"], closed_token, FETCH)
        assert await _run(client, closed["id"], closed_token, f"plain('http://127.0.0.1:{host_service}/')") == "403"

        assert await _metric(client, "allowed") - allowed_before == 2
        assert await _metric(client, "denied") - denied_before == 3

        # The proxy is the VM's own: it goes with a suspend and comes back with the restore.
        await client.api("POST", f"/v1/vms/{vm['id']}/suspend", status=200)
        got = await _run(client, vm["id"], token, f"plain('http://127.0.0.1:{host_service}/again')")
        assert got == "'hello from the host: /again'"
