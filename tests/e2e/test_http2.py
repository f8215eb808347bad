"""HTTP/2 toward clients with a real guest: curl over TLS (ALPN h2) and prior-knowledge h2c,
waking on request, tokens in each place, 100 MB each way, SSE, and 100 streams on one connection
while the VM wakes. One edge and one demo VM for the whole module."""

from __future__ import annotations

import asyncio
import hashlib
import resource
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, RstStreamFrame

from edge.h2_conn import make_listener_factory
from tests.e2e.conftest import IMAGES, _kill_qemus
from tests.e2e.edge_harness import DOMAIN, Client, edge_config, pattern, running_edge
from tests.e2e.guest import count_restores
from tests.e2e.test_shell_browser import CHROMIUM, chromium
from tests.unit.h2_client import H2Client
from tests.unit.test_h2_limits import Raw
from vmm.network import netns
from vmm.settings import VmmSettings

pytestmark = pytest.mark.asyncio(loop_scope="module")


class Setup:
    def __init__(self, client: Client, vm_id: str, token: str, h2c_port: int) -> None:
        self.client, self.vm_id, self.token, self.h2c_port = client, vm_id, token, h2c_port

    @property
    def host(self) -> str:
        return f"{self.vm_id}.{DOMAIN}"

    async def curl(self, path: str, *args: str, h2c: bool = False, token: bool = True) -> bytes:
        """curl over HTTP/2: TLS with ALPN, or prior-knowledge h2c; stdout is the body, then the
        protocol and status on the last line."""
        port = self.h2c_port if h2c else self.client.edge.port
        scheme = "http" if h2c else "https"
        cmd = ["curl", "-sS", "--max-time", "120", "--resolve", f"{self.host}:{port}:127.0.0.1",
               "--cacert", str(self.client.edge.cfg.server.tls_cert),
               "--http2-prior-knowledge" if h2c else "--http2", "-w", "\n%{http_version} %{http_code}",
               *(["-H", f"Authorization: Bearer {self.token}"] if token else []), *args,
               f"{scheme}://{self.host}:{port}{path}"]  # fmt: skip
        # Not subprocess.run: the edge runs in this event loop.
        pipe = asyncio.subprocess.PIPE
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=pipe, stderr=pipe)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()[-3000:]
        return out

    async def suspend(self) -> None:
        await self.client.api("POST", f"/v1/vms/{self.vm_id}/suspend", status=200)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup(session_root: Path, template_dir: Path) -> AsyncIterator[Setup]:
    state = Path(tempfile.mkdtemp(prefix="h2", dir=session_root))
    (state / "images").symlink_to(IMAGES)
    (state / "templates").symlink_to(template_dir)
    settings = replace(VmmSettings(), state_dir=state)
    cfg = edge_config(settings)
    cfg = replace(cfg, proxy=replace(cfg.proxy, http2=replace(cfg.proxy.http2, h2c=True)))
    try:
        async with running_edge(cfg) as client:
            factory = make_listener_factory(client.edge.ctx, tls=False, forwarded_proto="http")
            plain = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
            vm_id = await client.create_vm()
            token = await client.token(vm_id, ttl=3600)
            try:
                yield Setup(client, vm_id, token, plain.sockets[0].getsockname()[1])
            finally:
                plain.close()
    finally:
        _kill_qemus(state)
        for vm_dir in (state / "vms").iterdir() if (state / "vms").exists() else []:
            await netns.delete(vm_dir.name)
        subprocess.run(["rm", "-rf", str(state)], check=False)


def _answer(out: bytes) -> tuple[bytes, str, int]:
    body, _, last = out.rpartition(b"\n")
    version, status = last.decode().split()
    return body, version, int(status)


async def test_alpn_h2_wakes_the_vm_and_takes_tokens_in_each_place(setup: Setup) -> None:
    await setup.suspend()
    body, version, status = _answer(await setup.curl("/"))
    assert (version, status) == ("2", 200)
    assert orjson.loads(body)["counter"] >= 1
    assert setup.client.edge.manager.get(setup.vm_id).state.value == "running"
    body, version, status = _answer(await setup.curl(f"/headers?token={setup.token}", token=False, h2c=True))
    assert (version, status) == ("2", 200) and setup.token.encode() not in body
    cookie = ["-H", f"Cookie: mvm_token={setup.token}"]
    assert _answer(await setup.curl("/", *cookie, token=False))[1:] == ("2", 200)
    body, version, status = _answer(await setup.curl("/", token=False))
    assert (version, status) == ("2", 401) and orjson.loads(body)["error"] == "unauthorized"


async def test_100_mb_each_way_byte_exact_and_sse_streams(setup: Setup) -> None:
    size = 100 * 1024 * 1024
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "down"
        meta = await setup.curl(f"/download?bytes={size}", "-o", str(out))
        assert meta.split()[-2:] == [b"2", b"200"]
        digest = hashlib.sha256()
        with out.open("rb") as f:
            offset = 0
            while chunk := f.read(1 << 20):
                assert chunk == pattern(offset, len(chunk)), f"corrupt at {offset}"
                offset += len(chunk)
                digest.update(chunk)
        assert offset == size
        body, version, status = _answer(await setup.curl("/upload", "--data-binary", f"@{out}", h2c=True))
        assert (version, status) == ("2", 200)
        assert orjson.loads(body) == {"bytes": size, "pattern_ok": True, "first_bad": -1}
    arrivals = await _sse_arrivals(setup)
    assert [a[0] for a in arrivals] == [b"data: 0", b"data: 1", b"data: 2"]
    assert arrivals[-1][1] - arrivals[0][1] > 0.3, "events are streamed as they come, not buffered"


async def _sse_arrivals(setup: Setup) -> list[tuple[bytes, float]]:
    c = await _h2_client(setup)
    sid = c.request(setup.host, "/sse?n=3&interval_ms=200", headers={"authorization": f"Bearer {setup.token}"})
    arrivals: list[tuple[bytes, float]] = []
    seen = 0
    async with asyncio.timeout(30):
        while not c.answers[sid].done.is_set():
            await asyncio.sleep(0.01)
            body = bytes(c.answers[sid].body)
            lines = [line for line in body.split(b"\n") if line.startswith(b"data:")]
            for line in lines[seen:]:
                arrivals.append((line.strip(), time.monotonic()))
            seen = len(lines)
    await c.close()
    return arrivals


async def _h2_client(setup: Setup) -> H2Client:
    ctx = ssl.create_default_context(cafile=str(setup.client.edge.cfg.server.tls_cert))
    ctx.set_alpn_protocols(["h2"])
    return await H2Client.open(setup.client.edge.port, ctx, setup.host)


async def test_100_streams_on_one_connection_while_the_vm_wakes(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = setup.client.edge.manager
    await setup.suspend()
    restores = count_restores(manager, monkeypatch)
    c = await _h2_client(setup)
    auth = {"authorization": f"Bearer {setup.token}"}
    sids = [c.request(setup.host, "/", headers=auth) for _ in range(100)]
    answers = [await c.answer(sid, timeout=60) for sid in sids]
    await c.close()
    assert [a.status for a in answers] == [200] * 100
    counters = sorted(orjson.loads(a.body)["counter"] for a in answers)
    assert counters == list(range(counters[0], counters[0] + 100)), "each answered exactly once"
    assert restores() == 1


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is installed by scripts/install.sh")
async def test_chromium_loads_a_page_and_its_resources_over_h2(setup: Setup) -> None:
    page = setup.client.vm_url(setup.vm_id, f"/headers?token={setup.token}")  # the token becomes a cookie
    async with chromium() as tools:
        await tools.call("Page.enable")
        await tools.call("Page.navigate", url=page)
        async with asyncio.timeout(60):
            while await tools.evaluate("document.readyState") != "complete":
                await asyncio.sleep(0.2)
        loaded = await tools.evaluate(
            "Promise.all([...Array(20).keys()].map(i => fetch('/?r=' + i).then(r => r.text().then(() => r.status))))"
            ".then(s => JSON.stringify(s))",
            await_promise=True,
        )
        assert orjson.loads(loaded) == [200] * 20
        protocols = orjson.loads(
            await tools.evaluate(
                "JSON.stringify(['navigation', 'resource'].flatMap(t => performance.getEntriesByType(t))"
                ".map(e => [e.name, e.nextHopProtocol]))"
            )
        )
    names = {name.rsplit("/", 1)[1] for name, _ in protocols}
    assert {f"?r={i}" for i in range(20)} <= names and any("headers?" in n for n in names)  # page + resources
    assert {p for _, p in protocols} == {"h2"}, protocols


class _Target:
    """What the raw attack client of tests/unit/test_h2_limits.py needs: the h2c port, host, token."""

    def __init__(self, setup: Setup) -> None:
        self.port, self._setup = setup.h2c_port, setup

    def host(self) -> str:
        return self._setup.host

    def token(self) -> str:
        return self._setup.token


def _rapid_reset(raw: Raw, target: Any) -> None:
    for i in range(1000):
        raw.send(raw.headers(target, 2 * i + 1, "/"), RstStreamFrame(2 * i + 1, error_code=0x8))


def _continuation_flood(raw: Raw, target: Any) -> None:
    first = raw.headers(target, 1, "/")
    first.flags.discard("END_HEADERS")
    raw.send(first, *(ContinuationFrame(1, b"") for _ in range(1000)))


def _ping_flood(raw: Raw, target: Any) -> None:
    raw.send(*(PingFrame(0, b"12345678") for _ in range(5000)))


def _hpack_bomb(raw: Raw, target: Any) -> None:
    big = ("x-bomb", "b" * 4000)
    raw.send(HeadersFrame(1, raw.encoder.encode([big]) + raw.encoder.encode([big] * 2000), flags=["END_HEADERS"]))


@pytest.mark.parametrize("attack", [_rapid_reset, _continuation_flood, _ping_flood, _hpack_bomb])
async def test_attacks_end_in_goaway_with_bounded_cpu_while_others_are_served(setup: Setup, attack: Any) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF)  # the edge runs in this process
    target = _Target(setup)
    raw = await Raw.open(target)  # type: ignore[arg-type]
    attack(raw, target)
    _, version, status = _answer(await setup.curl("/"))
    assert (version, status) == ("2", 200), "another client is served meanwhile"
    await raw.until_closed()
    assert raw.goaway().error_code == 0xB  # ENHANCE_YOUR_CALM
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert cpu < 3.0, f"the edge spent {cpu:.2f} s of CPU on it"
    assert setup.client.edge.ctx.metrics.registry.get_sample_value("mvm_h2_streams") == 0
