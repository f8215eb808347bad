"""The edge over HTTPS on 127.0.0.1 with real guests: wake on request, tokens, streams, bounds."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from typing import Any

import aiohttp
import orjson
import pytest

from tests.e2e.edge_harness import DOMAIN, Client, bearer, edge_config, pattern, running_edge
from tests.e2e.guest import count_restores
from vmm.model import VmState
from vmm.settings import VmmSettings


async def _wait_state(client: Client, vm_id: str, state: str, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while (await client.api("GET", f"/v1/vms/{vm_id}"))["state"] != state:
            await asyncio.sleep(0.1)


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def test_idle_vm_suspends_and_next_request_wakes_it(settings: VmmSettings) -> None:
    async with running_edge(edge_config(settings)) as client:
        vm_id = await client.create_vm(idle_suspend_after=1)
        token = await client.token(vm_id)
        first = await client.get_json(vm_id, token)
        await _wait_state(client, vm_id, "suspended")
        assert client.edge.manager.get(vm_id).pid is None
        woke = await client.get_json(vm_id, token)
        assert (woke["boot_id"], woke["counter"]) == (first["boot_id"], first["counter"] + 1)
        assert woke["uptime"] > first["uptime"]
        async with client.session.get(client.base.format(host=f"api.{DOMAIN}") + "/metrics") as resp:
            metrics = await resp.text()
        assert _metric(metrics, 'mvm_wakes_total{result="ok"}') >= 1
        assert _metric(metrics, 'mvm_requests_total{status="200"}') >= 2


async def test_fifty_concurrent_requests_to_suspended_vm_one_restore(
    settings: VmmSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_edge(edge_config(settings)) as client:
        manager = client.edge.manager
        vm_id = await client.create_vm()
        token = await client.token(vm_id)
        await client.get_json(vm_id, token)
        await client.api("POST", f"/v1/vms/{vm_id}/suspend", status=200)
        restores = count_restores(manager, monkeypatch)
        answers = await asyncio.gather(*(client.get_json(vm_id, token) for _ in range(50)))
        assert restores() == 1
        assert sorted(a["counter"] for a in answers) == list(range(2, 52)), "each answered exactly once"


async def test_tokens_are_scoped_checked_and_kept_from_the_guest(settings: VmmSettings) -> None:
    async with running_edge(edge_config(settings)) as client:
        vm_a, vm_b = await client.create_vm(), await client.create_vm()
        token_a = await client.token(vm_a)

        async def reason(vm_id: str, headers: dict[str, str]) -> str:
            async with client.session.get(client.vm_url(vm_id), headers=headers) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"] == "Bearer"
                return str((await resp.json())["reason"])

        assert await reason(vm_b, bearer(token_a)) == "wrong_vm"
        assert await reason(vm_a, {}) == "missing"
        head, payload, sig = token_a.split(".")
        forged = f"{head}.{payload}.{sig[:-4]}AAAA"
        assert await reason(vm_a, bearer(forged)) == "bad_signature"
        unsigned_head = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT","kid":"dev-hs256"}').rstrip(b"=")
        assert await reason(vm_a, bearer(f"{unsigned_head.decode()}.{payload}.")) == "alg_not_allowed"
        other_key_sig = hmac.new(b"another-secret-of-32-bytes-length!!", f"{head}.{payload}".encode(), hashlib.sha256)
        wrong_key = f"{head}.{payload}.{base64.urlsafe_b64encode(other_key_sig.digest()).rstrip(b'=').decode()}"
        assert await reason(vm_a, bearer(wrong_key)) == "bad_signature"
        assert await reason(vm_a, bearer("not-a-jwt")) == "malformed"
        short = await client.token(vm_a, ttl=1)
        await client.get_json(vm_a, short)
        await asyncio.sleep(2.1)
        assert await reason(vm_a, bearer(short)) == "expired"

        # ?token= sets a host-only cookie and never reaches the guest; the cookie then opens the VM.
        url = client.vm_url(vm_a, f"/headers?x=1&token={token_a}&y=2")
        async with client.session.get(url, headers={"Cookie": "theme=dark"}) as resp:
            assert resp.status == 200
            cookie = resp.headers["Set-Cookie"]
            seen = await resp.json()
        assert cookie.startswith(f"mvm_token={token_a};")
        assert all(flag in cookie for flag in ("HttpOnly", "Secure", "Path=/")) and "Domain" not in cookie
        assert seen["target"] == "/headers?x=1&y=2"
        headers = {name.lower(): value for name, value in seen["headers"]}
        assert headers["cookie"] == "theme=dark" and "authorization" not in headers
        assert headers["x-forwarded-for"] == "127.0.0.1" and headers["x-forwarded-proto"] == "https"
        assert headers["x-forwarded-host"].startswith(f"{vm_a}.{DOMAIN}")
        async with client.session.get(
            client.vm_url(vm_a, "/headers"), headers={"Cookie": f"mvm_token={token_a}"}
        ) as resp:
            assert resp.status == 200
            forwarded = {name.lower(): value for name, value in (await resp.json())["headers"]}
        assert "cookie" not in forwarded and "authorization" not in forwarded


async def test_websocket_sse_and_100_mb_streams_are_byte_exact(settings: VmmSettings) -> None:
    async with running_edge(edge_config(settings)) as client:
        vm_id = await client.create_vm()
        token = await client.token(vm_id)
        async with client.session.ws_connect(client.vm_url(vm_id, "/ws"), headers=bearer(token)) as ws:
            for message in ("hello", "x" * 70_000):
                await ws.send_str(message)
                assert (await ws.receive_str()) == message
            await ws.send_bytes(bytes(range(256)) * 300)
            assert (await ws.receive_bytes()) == bytes(range(256)) * 300

        async with client.session.get(client.vm_url(vm_id, "/sse?n=3&interval_ms=200"), headers=bearer(token)) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            arrivals = []
            async for line in resp.content:
                if line.startswith(b"data:"):
                    arrivals.append((line.strip(), time.monotonic()))
        assert [a[0] for a in arrivals] == [b"data: 0", b"data: 1", b"data: 2"]
        assert arrivals[-1][1] - arrivals[0][1] > 0.3, "events are streamed as they come, not buffered"

        size = 100 * 1024 * 1024
        async with client.session.get(client.vm_url(vm_id, f"/download?bytes={size}"), headers=bearer(token)) as resp:
            assert resp.status == 200
            offset = 0
            async for chunk in resp.content.iter_chunked(1 << 20):
                assert chunk == pattern(offset, len(chunk)), f"corrupt at {offset}"
                offset += len(chunk)
        assert offset == size

        async def upload() -> Any:
            for offset in range(0, size, 1 << 20):
                yield pattern(offset, 1 << 20)

        async with client.session.post(
            client.vm_url(vm_id, "/upload"),
            data=upload(),
            headers={**bearer(token), "Content-Length": str(size)},
        ) as resp:
            result = await resp.json()
        assert result == {"bytes": size, "pattern_ok": True, "first_bad": -1}


async def test_held_requests_beyond_bound_or_timeout_get_503(
    settings: VmmSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = edge_config(settings, max_held_per_vm=2, wake_timeout=1.0, retry_after=3)
    async with running_edge(cfg) as client:
        manager = client.edge.manager
        vm_id = await client.create_vm()
        token = await client.token(vm_id)
        await client.api("POST", f"/v1/vms/{vm_id}/suspend", status=200)
        release = asyncio.Event()
        real_load = manager.runtime.load

        async def slow_restore(*args: Any, **kwargs: Any) -> None:
            await release.wait()  # the restore has started (the VM is restoring): wake_timeout counts
            await real_load(*args, **kwargs)

        monkeypatch.setattr(manager.runtime, "load", slow_restore)

        async def fetch() -> tuple[int, str | None, Any]:
            async with client.session.get(client.vm_url(vm_id), headers=bearer(token)) as resp:
                return resp.status, resp.headers.get("Retry-After"), await resp.json()

        tasks = [asyncio.create_task(fetch()) for _ in range(6)]
        async with asyncio.timeout(10):
            while sum(t.done() for t in tasks) < 4:
                await asyncio.sleep(0.02)
        release.set()
        results = await asyncio.gather(*tasks)
        rejected = [r for r in results if r[0] == 503]
        assert len(rejected) == 4 and all(r[1] == "3" for r in rejected)
        assert all(r[2]["error"] and r[2]["message"] for r in rejected)
        assert sorted(r[2]["counter"] for r in results if r[0] == 200) == [1, 2]

        # A restore slower than wake_timeout: 503 + Retry-After, and the wake still completes.
        await client.api("POST", f"/v1/vms/{vm_id}/suspend", status=200)
        release.clear()
        started = time.monotonic()
        status, retry_after, body = await fetch()
        assert (status, retry_after) == (503, "3") and "wake" in body["message"].lower()
        assert time.monotonic() - started < 5, "held requests are bounded by wake_timeout"
        release.set()
        await _wait_state(client, vm_id, "running")
        assert (await client.get_json(vm_id, token))["counter"] == 3


async def test_hosts_ports_and_control_api_errors(settings: VmmSettings) -> None:
    async with running_edge(edge_config(settings)) as client:
        vm_id = await client.create_vm(ports=[8081])
        token = await client.token(vm_id)
        assert (await client.get_json(vm_id, token, port=8081))["port"] == 8081
        async with client.session.get(client.vm_url(vm_id, port=9999), headers=bearer(token)) as resp:
            assert resp.status == 403 and (await resp.json())["error"]
        await _ports_by_header_and_subprotocol(client, vm_id, token)
        async with client.session.get(client.vm_url("vnosuchvm00"), headers=bearer(token)) as resp:
            assert resp.status == 401, "without a token for that id, existence is not revealed"
        async with client.session.get(client.base.format(host=f"not-a-vm.{DOMAIN}") + "/") as resp:
            assert resp.status == 404 and (await resp.json())["error"]
        bad = await client.api("POST", "/v1/vms", {"policy": {"vcpus": 0}}, status=422)
        assert "policy.vcpus" in bad["message"]
        await client.api("POST", "/v1/vms", {"template": "nope"}, status=404)
        await client.api("POST", "/v1/vms/vnosuchvm00/suspend", status=404)
        async with client.session.post(
            client.base.format(host=f"api.{DOMAIN}") + "/v1/vms", data=b"{not json", headers=client.admin
        ) as resp:
            assert resp.status == 400 and "JSON" in (await resp.json())["message"]
        async with client.session.get(client.base.format(host=f"api.{DOMAIN}") + "/v1/vms") as resp:
            assert resp.status == 401 and (await resp.json())["error"] == "unauthorized"
        spec = await client.api("GET", "/openapi.json", status=200)
        assert "/v1/vms/{vm_id}/tokens" in spec["paths"]
        listed = await client.api("GET", "/v1/vms", status=200)
        assert [vm["id"] for vm in listed["vms"]] == [vm_id]
        await client.api("DELETE", f"/v1/vms/{vm_id}", status=204)
        feed = await client.api("GET", f"/v1/events?follow=0&vm={vm_id}", status=200)  # one process: the registry's
        assert [(e["seq"], e["type"]) for e in feed["events"]] == [(1, "created"), (2, "running"), (3, "terminated")]
        async with client.session.get(client.vm_url(vm_id), headers=bearer(token)) as resp:
            assert resp.status == 404


async def _ports_by_header_and_subprotocol(client: Client, vm_id: str, token: str) -> None:
    """X-Mvm-Port and the subprotocol mvm.port.N reach the port they name (the demo listens on 8080 and
    8081 and says which answered); the guest sees neither, nor a request whose token does not open the port."""
    auth = bearer(token)
    for chosen in ({"X-Mvm-Port": "8081"}, {"Sec-WebSocket-Protocol": "mvm.port.8081"}):
        async with client.session.get(client.vm_url(vm_id), headers={**auth, **chosen}) as resp:
            assert resp.status == 200 and (await resp.json())["port"] == 8081, chosen
    both = {**auth, "X-Mvm-Port": "8080", "Sec-WebSocket-Protocol": "chat, mvm.port.8080"}
    async with client.session.get(client.vm_url(vm_id, "/headers"), headers=both) as resp:
        seen = {name.lower(): value for name, value in (await resp.json())["headers"]}
    assert "x-mvm-port" not in seen and seen["sec-websocket-protocol"] == "chat"
    async with client.session.ws_connect(client.vm_url(vm_id, "/ws"), headers=auth, protocols=("mvm.port.8081",)) as ws:
        assert ws.protocol == "mvm.port.8081"  # the guest was offered none: the edge's 101 names the one asked for
        await ws.send_str("hi")
        assert await ws.receive_str() == "hi"
    app_only = (await client.api("POST", f"/v1/vms/{vm_id}/tokens", {"ports": "8080"}, status=201))["token"]
    counter = (await client.get_json(vm_id, token))["counter"]
    async with client.session.get(client.vm_url(vm_id), headers={**bearer(app_only), "X-Mvm-Port": "8081"}) as resp:
        assert resp.status == 403 and "port 8081" in (await resp.json())["message"]
    assert (await client.get_json(vm_id, token))["counter"] == counter + 1, "the refused request reached the guest"


async def test_edge_restart_keeps_suspended_vm_which_then_wakes(settings: VmmSettings) -> None:
    cfg = edge_config(settings)
    async with running_edge(cfg) as client:
        vm_id = await client.create_vm()
        token = await client.token(vm_id)
        before = await client.get_json(vm_id, token)
        await client.api("POST", f"/v1/vms/{vm_id}/suspend", status=200)
        # keep the VM for the next edge: the harness deletes what it still knows
        client.edge.manager.records.live.clear()
    async with running_edge(cfg) as client:
        assert client.edge.manager.get(vm_id).state is VmState.SUSPENDED
        after = await client.get_json(vm_id, token)
        assert (after["boot_id"], after["counter"]) == (before["boot_id"], before["counter"] + 1)
        listed = orjson.dumps(await client.api("GET", "/v1/vms", status=200))
        assert json.loads(listed)["vms"][0]["state"] == "running"


async def test_websockets_end_when_their_vm_is_deleted_or_suspended(settings: VmmSettings) -> None:
    async with running_edge(edge_config(settings)) as client:
        doomed, sleepy = await client.create_vm(), await client.create_vm()
        sockets = []
        for vm_id in (doomed, sleepy):
            ws = await client.session.ws_connect(client.vm_url(vm_id, "/ws"), headers=bearer(await client.token(vm_id)))
            await ws.send_str("hi")
            assert await ws.receive_str() == "hi"
            sockets.append(ws)
        await client.api("DELETE", f"/v1/vms/{doomed}", status=204)
        await client.api("POST", f"/v1/vms/{sleepy}/suspend", status=200)
        for ws in sockets:
            message = await asyncio.wait_for(ws.receive(), 5)  # no hang: the tunnel is closed
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
            await ws.close()
        async with asyncio.timeout(5):
            while client.edge.ctx.open_streams:
                await asyncio.sleep(0.05)
