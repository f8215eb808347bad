"""`mvm serve --workers 2`, the default mode: the per-IP limit and /metrics are the machine's, not a worker's.

Connections from 127.0.0.1 are spread over both workers by SO_REUSEPORT; which worker holds
each one is read from `ss`. A guest's egress is counted by the host process, and /metrics
is fetched through the edge's port, so a worker answers it.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.fleet_harness import DOMAIN, EdgeClient
from tests.e2e.test_egress import FETCH, host_service  # noqa: F401 (a fixture)
from tests.e2e.test_fleet import serve_workers
from vmm.settings import VmmSettings

LIMIT = 6


def _holders(port: int) -> dict[int, int]:
    """Client port -> pid of the worker holding the server side of that connection to `port`."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    holders = {}
    for line in out.splitlines():
        fields = line.split()
        pid = re.search(r"pid=(\d+)", line)
        if pid is not None:
            holders[int(fields[3].rsplit(":", 1)[1])] = int(pid.group(1))
    return holders


class Held:
    """A keep-alive client connection that has had one answer: its worker has counted it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.port = int(writer.get_extra_info("sockname")[1])

    @classmethod
    async def open(cls, port: int) -> tuple[Held, bytes]:
        """A connection and the status line of its first answer (429s close it)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: api.{DOMAIN}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        return cls(reader, writer), head.split(b"\r\n")[0]

    def close(self) -> None:
        self.writer.close()


async def _admitted(port: int) -> Held:
    """A held connection, once the edge has room for it: a close just made is seen a moment later."""
    async with asyncio.timeout(20):
        while True:
            one, status = await Held.open(port)
            if status == b"HTTP/1.1 200 OK":
                return one
            one.close()
            assert status.startswith(b"HTTP/1.1 429"), status
            await asyncio.sleep(0.1)


async def _unasked(port: int) -> bytes:
    """What a new connection gets before it sends anything: a refusal is answered and closed at once."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(), 10)
    except TimeoutError:
        return b"nothing: the connection was admitted"
    finally:
        writer.close()


def _sample(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and s.labels == (labels or {})
    )


async def _metrics(client: EdgeClient) -> str:
    status, _, body = await client.request(f"api.{DOMAIN}", "GET", "/metrics")
    assert status == 200, body
    return body.decode()


async def test_the_per_ip_limit_holds_across_workers(settings: VmmSettings, tmp_path: Path) -> None:
    async with serve_workers(settings, tmp_path, proxy={"max_connections_per_ip": LIMIT}, log={"level": "warning"}) as (
        _,
        client,
    ):
        held: list[Held] = []
        try:
            for _ in range(LIMIT):  # the first LIMIT are admitted, each counted before the next
                one, status = await Held.open(client.port)
                assert status == b"HTTP/1.1 200 OK", (len(held), status)
                held.append(one)
            for _ in range(50):  # until the connections are on both workers (SO_REUSEPORT decides)
                holders = _holders(client.port)
                if len({holders[h.port] for h in held}) == 2:
                    break
                held.pop().close()
                held.append(await _admitted(client.port))
            workers = {holders[h.port] for h in held}
            assert len(workers) == 2, "both workers hold some of the connections, none holds LIMIT alone"
            for _ in range(8):  # past the limit, whichever worker takes it
                answer = await _unasked(client.port)
                assert answer.startswith(b"HTTP/1.1 429"), answer
            held.pop().close()
            async with asyncio.timeout(20):  # until a worker has seen it close
                while (status := (await client.request(f"api.{DOMAIN}", "GET", "/healthz"))[0]) == 429:
                    await asyncio.sleep(0.1)
            assert status == 200
            async with asyncio.timeout(10):  # workers write their counts to the shared files each second
                while _sample(text := await _metrics(client), "mvm_client_connections") != LIMIT:
                    await asyncio.sleep(0.2)
            assert _sample(text, "mvm_connections_refused_total", {"reason": "per_ip"}) >= 8
        finally:
            for one in held:
                one.close()


async def test_egress_of_a_guest_shows_in_metrics_through_the_edge(
    settings: VmmSettings,
    sandbox_template: str,
    tmp_path: Path,
    host_service: int,  # noqa: F811
) -> None:
    async with serve_workers(settings, tmp_path, log={"level": "warning"}) as (_, client):
        policy = {"egress": [f"127.0.0.1:{host_service}"]}
        vm = await client.api("POST", "/v1/vms", {"template": sandbox_template, "policy": policy}, status=201)
        token = (await client.api("POST", f"/v1/vms/{vm['id']}/tokens", {}, status=201))["token"]
        before = await _metrics(client)

        async def run(code: str) -> object:
            status, _, body = await client.request(
                f"{vm['id']}.{DOMAIN}", "POST", "/run", f"Authorization: Bearer {token}\r\n",
                orjson.dumps({"code": code}),
            )  # fmt: skip
            result = orjson.loads(body)
            assert status == 200 and result["error"] is None, result
            return result["result"]

        await run(FETCH)
        assert await run(f"plain('http://127.0.0.1:{host_service}/plain')") == "'hello from the host: /plain'"
        assert await run(f"plain('http://127.0.0.1:{host_service + 1}/')") == "403"
        for _ in range(4):  # any worker may answer: each one shows the host's counts
            after = await _metrics(client)
            for decision in ("allowed", "denied"):
                name, labels = "mvm_egress_attempts_total", {"decision": decision}
                assert _sample(after, name, labels) - _sample(before, name, labels) == 1, (decision, after)
            assert _sample(after, "mvm_vms", {"state": "running"}) == 1, "VM states are not summed over processes"
        await client.api("DELETE", f"/v1/vms/{vm['id']}", status=204)
