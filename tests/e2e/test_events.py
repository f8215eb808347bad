"""The lifecycle event feed of `mvm serve --workers 2`, one server for every check.

An SSE client open from the start sees exactly created, running, suspended (idle), restored
(a request woke it) and terminated; a client that comes back with Last-Event-ID gets the
rest without a gap; connections held by either edge worker get the same sequence (the
catalog numbers it); `mvm events` prints it; a local webhook receiver gets every event,
signed, and the one it answered 500 again.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from edge.webhooks import SIGNATURE_HEADER, verify
from tests.e2e.fleet_harness import ADMIN, DOMAIN, REPO
from tests.e2e.test_fleet import serve_workers
from tests.e2e.test_serve_shared import _holders
from vmm.settings import VmmSettings

SECRET = "e2e-webhook-secret-0123"
EXPECTED = ["created", "running", "suspended", "restored", "terminated"]


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers its first POST with 500, every other with 200."""

    def __init__(self) -> None:
        self.posts: list[tuple[int, str, bool]] = []  # (status answered, X-Mvm-Event-Id, signature valid)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = 500 if not self.posts else 200
        valid = verify(SECRET, body, request.headers.get(SIGNATURE_HEADER, ""))
        self.posts.append((status, request.headers["X-Mvm-Event-Id"], valid))
        return web.Response(status=status)


async def _receiver() -> tuple[Receiver, web.AppRunner, str]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return receiver, runner, f"http://127.0.0.1:{runner.addresses[0][1]}/hook"


async def _events(resp: aiohttp.ClientResponse, until: str, vm: str | None = None) -> AsyncIterator[dict[str, Any]]:
    """The stream's events (of `vm` if given) up to and including the first of type `until`."""
    async with asyncio.timeout(60):
        data = b""
        async for line in resp.content:
            if line.startswith(b"data: "):
                data = line[6:]
            elif line == b"\n" and data:
                event = orjson.loads(data)
                data = b""
                if vm is None or event["vm"] == vm:
                    yield event
                    if event["type"] == until:
                        return


async def _collect(resp: aiohttp.ClientResponse, until: str, vm: str | None = None) -> list[dict[str, Any]]:
    return [event async for event in _events(resp, until, vm)]


async def test_the_event_feed_through_two_edge_workers_and_a_webhook(settings: VmmSettings, tmp_path: Path) -> None:
    receiver, receiver_runner, url = await _receiver()
    events = {"keepalive": 1.0, "webhook_backoff": 0.1, "webhooks": [{"url": url, "secret": SECRET}]}
    try:
        async with (
            serve_workers(settings, tmp_path, events=events, log={"level": "warning"}) as (_, client),
            aiohttp.ClientSession(headers={"Host": f"api.{DOMAIN}", "Authorization": f"Bearer {ADMIN}"}) as http,
        ):
            feed = f"http://127.0.0.1:{client.port}/v1/events"
            async with http.get(feed, timeout=aiohttp.ClientTimeout(total=None)) as live:
                assert live.status == 200 and live.headers["Content-Type"] == "text/event-stream"
                vm = await client.api("POST", "/v1/vms", {"policy": {"idle_suspend_after": 2}}, status=201)
                vm_id = vm["id"]
                token = (await client.api("POST", f"/v1/vms/{vm_id}/tokens", {}, status=201))["token"]
                first = await _collect(live, "suspended", vm_id)  # the reaper's, after 2 s without requests
                assert await client.counter(vm_id, token) == 1  # the guest's memory came back with it
                await client.api("DELETE", f"/v1/vms/{vm_id}", status=204)
                seen = first + await _collect(live, "terminated", vm_id)
            assert [e["type"] for e in seen] == EXPECTED, seen
            assert [e["seq"] for e in seen] == [1, 2, 3, 4, 5]
            assert [e["state"] for e in seen] == ["pending", "running", "suspended", "running", "terminated"]
            assert "idle" in seen[2]["reason"] and seen[4]["reason"] == "deleted"
            assert all(e["vm"] == vm_id and e["template"] == "demo" and e["time"].endswith("Z") for e in seen)

            # Resumed after seq 2: the rest, no gap; the retained backlog as JSON says the same.
            async with http.get(feed, headers={"Last-Event-ID": "2"}) as resumed:
                assert [e["seq"] for e in await _collect(resumed, "terminated")] == [3, 4, 5]
            async with http.get(feed, params={"follow": "0", "type": "suspended,restored"}) as backlog:
                assert [e["seq"] for e in (await backlog.json())["events"]] == [3, 4]

            # Whichever worker holds the connection, the same sequence (each worker reads the catalog).
            by_worker: dict[int, list[tuple[int, str]]] = {}
            for _ in range(20):
                async with http.get(feed, params={"after": "0"}) as again:
                    local_port = again.connection.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
                    worker = _holders(client.port)[local_port]
                    by_worker[worker] = [(e["seq"], e["type"]) for e in await _collect(again, "terminated")]
                if len(by_worker) == 2:
                    break
            assert len(by_worker) == 2, "connections reached both workers"
            one, other = by_worker.values()
            assert one == other == [(e["seq"], e["type"]) for e in seen]

            cli = subprocess.run(
                [sys.executable, "-m", "mvm.cli", "events", "--config", str(tmp_path / "serve.toml"), "--vm", vm_id],
                cwd=REPO, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)},
            )  # fmt: skip
            assert cli.returncode == 0, cli.stderr
            assert [orjson.loads(line)["type"] for line in cli.stdout.splitlines()] == EXPECTED

            async with asyncio.timeout(30):  # the host's webhook sender: every event, the 500 one twice
                while len(receiver.posts) < 6:
                    await asyncio.sleep(0.1)
            assert [(status, seq) for status, seq, _ in receiver.posts] == [
                (500, "1"), (200, "1"), (200, "2"), (200, "3"), (200, "4"), (200, "5"),
            ]  # fmt: skip
            assert all(valid for _, _, valid in receiver.posts)
    finally:
        await receiver_runner.cleanup()
