"""Graceful shutdown: requests in flight finish, idle clients are closed, no VM is woken."""

from __future__ import annotations

import asyncio
import tempfile
from typing import cast

from aiohttp import web

from tests.unit.proxy_harness import OTHER_VM, VM, FakeBackend, Upstream, start_edge
from vmm.manager import VmManager
from vmm.model import VmState


async def test_drain_finishes_requests_in_flight_and_refuses_wakes(upstream: Upstream) -> None:
    backend = FakeBackend()
    backend.add_vm(VM, upstream.port)
    backend.add_vm(OTHER_VM, upstream.port, state=VmState.SUSPENDED)
    edge = await start_edge(backend)
    try:
        streaming = await edge.connect()
        auth = f"Authorization: Bearer {edge.token()}\r\n"
        await streaming.send(f"GET /sse HTTP/1.1\r\nHost: {edge.host()}\r\n{auth}\r\n".encode())
        status, _ = await streaming.head()
        assert status == 200
        idle = await edge.connect()
        assert (await idle.get("/echo", edge.host(), {"Authorization": f"Bearer {edge.token()}"})).status == 200
        arriving = await edge.connect()  # its head is half sent when the drain starts
        other = f"Authorization: Bearer {edge.token(OTHER_VM)}\r\n"
        await arriving.send(f"GET /echo HTTP/1.1\r\nHost: {edge.host(OTHER_VM)}\r\n{other}".encode())
        await asyncio.sleep(0.05)

        drain = asyncio.ensure_future(edge.ctx.drain(10.0))
        assert await idle.closed(), "a client between requests is closed at once"
        await arriving.send(b"\r\n")
        refused = await arriving.response()
        assert refused.status == 503 and refused.json()["error"] == "unavailable"
        assert refused.header("Retry-After") == "2" and refused.header("Connection") == "close"
        assert "shutting down" in refused.json()["message"]
        assert await arriving.closed()
        assert backend.ensure_calls == 0 and backend.vms[OTHER_VM].state is VmState.SUSPENDED

        assert not drain.done(), "the stream in flight is waited for"
        upstream.state["sse_go"].set()
        rest = await asyncio.wait_for(streaming.reader.read(), 5)
        assert rest.endswith(b"data: two\n\n\r\n0\r\n\r\n"), "the response in flight ended whole"
        assert await asyncio.wait_for(drain, 5) == 0
        assert edge.ctx.clients == set()
    finally:
        await edge.close()


async def test_drain_cuts_what_outlives_its_timeout(upstream: Upstream) -> None:
    backend = FakeBackend()
    backend.add_vm(VM, upstream.port)
    edge = await start_edge(backend)
    try:
        c = await edge.connect()
        auth = f"Authorization: Bearer {edge.token()}\r\n"
        await c.send(f"GET /sse HTTP/1.1\r\nHost: {edge.host()}\r\n{auth}\r\n".encode())
        assert (await c.head())[0] == 200
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await edge.ctx.drain(0.3) == 1
        assert 0.25 < loop.time() - started < 2
        try:
            await asyncio.wait_for(c.reader.read(), 5)  # what the stream sent, then the end
        except ConnectionError:
            pass  # cut: a reset is an end too
        else:
            assert c.reader.at_eof()
        async with asyncio.timeout(5):
            while edge.ctx.open_streams or edge.ctx.clients:
                await asyncio.sleep(0.01)
        late = await edge.connect()  # accepted after the drain (the harness keeps listening): closed at once
        assert await late.closed()
        upstream.state["sse_go"].set()
    finally:
        await edge.close()


async def test_app_stop_drains_before_the_manager_shuts_down(upstream: Upstream) -> None:
    """edge.app.stop: listener closed, requests in flight finished, wakes refused until the
    manager's own shutdown is over."""
    from edge import app
    from mvm.config import load_config
    from vmm.network.egress_proxy import EgressProxies

    backend = FakeBackend()
    backend.add_vm(VM, upstream.port)
    harness = await start_edge(backend)
    seen: dict[str, object] = {}

    class Manager:
        def refuse_wakes(self) -> None:
            seen["manager_refuses"] = True

        async def close(self) -> None:
            seen["wakes_refused"] = harness.ctx.wakes_refused
            seen["clients"] = len(harness.ctx.clients)

    class Reaper:
        async def stop(self) -> None:
            pass

    control = web.AppRunner(web.Application())
    await control.setup()
    manager, reaper = cast(VmManager, Manager()), cast(app.Reaper, Reaper())
    control_dir = tempfile.TemporaryDirectory()
    egress = EgressProxies(harness.ctx.metrics.egress)
    edge = app.Edge(load_config(None), manager, harness.ctx, harness.server, control, reaper, control_dir, egress)
    try:
        c = await harness.connect()
        auth = f"Authorization: Bearer {harness.token()}\r\n"
        await c.send(f"GET /sse HTTP/1.1\r\nHost: {harness.host()}\r\n{auth}\r\n".encode())
        assert (await c.head())[0] == 200
        stopping = asyncio.ensure_future(app.stop(edge))
        await asyncio.sleep(0.1)
        assert not stopping.done() and not harness.server.is_serving()
        upstream.state["sse_go"].set()
        await asyncio.wait_for(stopping, 5)
        assert seen == {"manager_refuses": True, "wakes_refused": True, "clients": 0}
    finally:
        await harness.close()
