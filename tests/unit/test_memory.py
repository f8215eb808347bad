"""Bursts of client connections: guest connections stay bounded, and memory comes back."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from edge.memory import BurstTrimmer, rss_bytes
from edge.tls import make_dev_cert, server_context
from tests.unit.proxy_harness import DOMAIN, VM, Client, Edge, FakeBackend, Upstream, start_edge

CLIENTS = 500


async def _until(cond: object, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def _burst(edge: Edge) -> None:
    """CLIENTS keep-alive clients over TLS, one request each, all idle at once; then they leave."""
    auth = {"Authorization": f"Bearer {edge.token()}"}
    clients: list[Client] = []
    for _ in range(CLIENTS // 50):  # within the listener's backlog
        clients += await asyncio.gather(*(edge.connect() for _ in range(50)))
    responses = await asyncio.gather(*(c.get("/echo", edge.host(), auth) for c in clients))
    assert [r.status for r in responses] == [200] * CLIENTS
    assert len(edge.ctx.clients) == CLIENTS
    pool = edge.ctx.pool
    # Idle keep-alive clients pin no guest connection (past the pool's grace for a burst's surplus).
    await _until(lambda: pool.live_count(VM) <= pool.per_vm)
    trims = edge.ctx.trimmer.trims
    for c in clients:
        c.close()
    edge.clients.clear()
    del clients, responses
    await _until(lambda: not edge.ctx.clients and edge.ctx.trimmer.trims > trims)


async def test_memory_comes_back_after_bursts_of_idle_keep_alive_clients(upstream: Upstream, tmp_path: Path) -> None:
    cert, key = make_dev_cert(DOMAIN, tmp_path)
    backend = FakeBackend()
    backend.add_vm(VM, upstream.port)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    edge = await start_edge(backend, tls=(server_context(cert, key), client_ctx), max_connections_per_ip=0)
    edge.ctx.trimmer.delay = 0.3  # the clients' side of the connections (this process too) goes meanwhile
    edge.ctx.pool.surplus_grace = 0.1
    try:
        await _burst(edge)  # warm-up: caches, the pool, the interpreter's own arenas
        before = rss_bytes()
        assert before > 0
        for _ in range(2):
            await _burst(edge)
            after = rss_bytes()
            assert after <= before * 1.10, f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB"
    finally:
        await edge.close()


async def test_burst_trimmer_trims_once_a_burst_has_ended() -> None:
    calls: list[int] = []

    def fake_trim() -> bool:
        calls.append(1)
        return True

    trimmer = BurstTrimmer(min_drop=10, delay=0.01, trim_fn=fake_trim)
    for n in range(1, 101):
        trimmer.opened(n)
    for n in range(99, 59, -1):  # a drop of 40 of 100: not yet half
        trimmer.closed(n)
    await asyncio.sleep(0.05)
    assert calls == []
    for n in range(59, -1, -1):
        trimmer.closed(n)
    await asyncio.sleep(0.05)
    assert calls == [1] and trimmer.trims == 1
    for n in range(1, 6):  # a trickle after it: too small to trim for
        trimmer.opened(n)
    for n in range(4, -1, -1):
        trimmer.closed(n)
    await asyncio.sleep(0.05)
    assert calls == [1]
    trimmer.close()
