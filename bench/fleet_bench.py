"""Fleet benchmark: edge workers against nginx workers, the cost of the data-port hop, the catalog under churn.

1. Edge scaling: the edge's data plane (`bench.local_edge`, 1 and 2 worker processes on one
   port, SO_REUSEPORT) and nginx (1 and 2 worker processes) in front of the same fast loopback
   upstream, wrk -c64 with a token on every request, HTTP and TLS. The edge/nginx ratio per
   worker count, and each one's scaling factor from 1 to 2 workers.
2. Cost of each hop: a real guest through an edge that reaches it in its namespace (same
   host) and through one that goes edge -> host data port -> guest (as from another machine),
   plaintext and with mutual TLS (a second host and edge with `cluster.tls`).
3. Catalog under churn: VM creates and wakes per second through a host and an edge on a
   throwaway PostgreSQL, and raw catalog writes per second on PostgreSQL and SQLite.

Everything listens and loads on 127.0.0.1 (PostgreSQL on a unix socket); every load is
bounded in time and count, and every process, VM, namespace and file is removed at the end.
Usage: .venv/bin/python -m bench.fleet_bench [--rounds 3] [--seconds 5] [--vms 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import uvloop

from edge.tls import make_dev_cert
from fleet import cluster_ca
from fleet.catalog import open_catalog
from tests.pg import PgCluster, create_database
from vmm.model import VmRecord, VmState
from vmm.policy import Policy

from . import local_edge, nginx
from .edge_bench import BODY, CONNECTIONS, DOMAIN, REPO, _expect_200, _free_ports, _header_args
from .stats import median, table
from .tools import WrkResult, state_dir, stop, wrk

ADMIN = "dev-admin-key-change-me"
HOP_CONNECTIONS = 4  # below saturation: the hop's own delay, not queueing


async def edge_scaling(root: Path, cert: Path, key: Path, rounds: int, seconds: int) -> str:
    """Section 1: req/s of the edge and nginx with 1 and 2 workers, interleaved rounds."""
    results: dict[tuple[str, int, str], list[WrkResult]] = {}
    async with contextlib.AsyncExitStack() as stack:
        (up_port,) = _free_ports(1)
        upstream = nginx.fixed_answer(up_port, BODY)
        await stack.enter_async_context(nginx.running(root / "upstream", upstream, master=False))
        targets: dict[tuple[str, int, str], tuple[str, dict[str, str]]] = {}
        for workers in (1, 2):
            http_port, tls_port = _free_ports(2)
            conf = nginx.reverse_proxy(f"127.0.0.1:{up_port}", 32, [(http_port, False), (tls_port, True)], cert, key)
            await stack.enter_async_context(nginx.running(root / f"nginx-{workers}", conf, workers=workers))
            edge = await stack.enter_async_context(
                local_edge.running(up_port, cert, key, 32, root / f"edge-{workers}.log", workers=workers)
            )
            headers = {"Host": edge.host, "Authorization": f"Bearer {edge.token}"}
            for listener, ngx, mine in (("HTTP", http_port, edge.http_port), ("TLS", tls_port, edge.tls_port)):
                scheme = "https" if listener == "TLS" else "http"
                targets[("nginx", workers, listener)] = (f"{scheme}://127.0.0.1:{ngx}/", headers)
                targets[("edge", workers, listener)] = (f"{scheme}://127.0.0.1:{mine}/", headers)
        for url, headers in targets.values():
            await _expect_200(url, ["-k", *_header_args(headers)])
            await wrk(url, headers, CONNECTIONS, 1)  # warm-up: pools, token caches, every worker
        for _ in range(rounds):
            for name, (url, headers) in targets.items():
                results.setdefault(name, []).append(await wrk(url, headers, CONNECTIONS, seconds))

    def rps(who: str, workers: int, listener: str) -> float:
        return median([r.rps for r in results[(who, workers, listener)]])

    rows, verdicts = [], []
    for listener in ("HTTP", "TLS"):
        for workers in (1, 2):
            ratio = rps("edge", workers, listener) / rps("nginx", workers, listener)
            rows.append([listener, workers, f"{rps('nginx', workers, listener):,.0f}",
                         f"{rps('edge', workers, listener):,.0f}", f"{ratio:.2f}"])  # fmt: skip
        one, two = (rps("edge", w, listener) / rps("nginx", w, listener) for w in (1, 2))
        edge_scale = rps("edge", 2, listener) / rps("edge", 1, listener)
        nginx_scale = rps("nginx", 2, listener) / rps("nginx", 1, listener)
        verdicts.append(
            f"- {listener}: edge scales {edge_scale:.2f}x from 1 to 2 workers, nginx {nginx_scale:.2f}x; "
            f"edge/nginx {one:.2f} -> {two:.2f} ({'does not fall: met' if two >= one * 0.97 else 'falls: NOT met'})"
        )
    return "\n".join([
        "## 1. Edge scaling (fast loopback upstream, 100-byte answer)",
        "",
        f"wrk -t1 -c{CONNECTIONS} -d{seconds}s, {rounds} interleaved rounds (medians); the edge's workers and "
        "nginx's share the port (SO_REUSEPORT / nginx's own); wrk and the upstream share the same 2 cores, "
        "so 2 workers cannot double here.",
        "",
        table(["listener", "workers", "nginx req/s", "edge req/s", "edge / nginx"], rows),
        "",
        *verdicts,
    ])  # fmt: skip


@contextlib.asynccontextmanager
async def _role(args: list[str], config: Path, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mvm.cli", *args, "--config", str(config), cwd=REPO,
            stdout=asyncio.subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        yield proc
    finally:
        await stop(proc, grace=30)


async def _api(port: int, method: str, path: str, body: Any = None) -> Any:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = orjson.dumps(body) if body is not None else b""
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: api.{DOMAIN}\r\nAuthorization: Bearer {ADMIN}\r\n"
                     f"Connection: close\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)  # fmt: skip
        raw = await asyncio.wait_for(reader.read(), 120)
    finally:
        writer.close()
    status = int(raw.split(b" ", 2)[1])
    payload = raw.partition(b"\r\n\r\n")[2]
    if status >= 300:
        raise RuntimeError(f"{method} {path}: {status} {payload[:300]!r}")
    return orjson.loads(payload) if payload else None


async def _until(check: Any, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.1)


def _toml(sections: dict[str, dict[str, Any]]) -> str:
    return "".join(
        f"[{name}]\n" + "".join(f"{k} = {orjson.dumps(v).decode()}\n" for k, v in values.items())
        for name, values in sections.items()
    )


@contextlib.asynccontextmanager
async def _fleet(
    root: Path, catalog_url: str, edges: dict[str, bool], tls: bool = False
) -> AsyncIterator[dict[str, int]]:
    """One `mvm host` and an edge per entry of `edges` (name -> reaches guests directly); yields edge ports.

    `tls`: the host API and data port speak mutual TLS, with certificates of a CA made here."""
    state = state_dir(root / "host")
    host_port, data_port, *edge_ports = _free_ports(2 + len(edges))
    fast: dict[str, Any] = {"heartbeat_interval": 0.3, "down_after": 3.0}
    if tls:
        cluster_ca.init_ca(root / "cluster")
        for role in ("host", "edge"):
            cluster_ca.issue(root / "cluster", role, role, root / "cluster", cluster_ca.LOOPBACK)
        fast |= {"tls": True, "ca_file": str(root / "cluster" / "ca.crt")}
        fast |= {f"{role}_{kind}": str(root / "cluster" / f"{role}.{ext}")
                 for role in ("host", "edge") for kind, ext in (("cert", "crt"), ("key", "key"))}  # fmt: skip
    (root / "host.toml").write_text(_toml({
        "vmm": {"state_dir": str(state)}, "catalog": {"url": catalog_url}, "log": {"level": "warning"},
        "cluster": {"host_id": "bench", "host_listen": f"127.0.0.1:{host_port}",
                    "data_listen": f"127.0.0.1:{data_port}", **fast},
    }))  # fmt: skip
    ports = dict(zip(edges, edge_ports, strict=True))
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(_role(["host"], root / "host.toml", root / "host.log"))
        for name, direct in edges.items():
            (root / f"{name}.toml").write_text(_toml({
                # the host's state dir: with the embedded SQLite catalog, that is where the catalog is
                "server": {"listen_port": ports[name], "tls": False}, "vmm": {"state_dir": str(state)},
                "catalog": {"url": catalog_url}, "cluster": {**fast, "direct": direct}, "log": {"level": "warning"},
            }))  # fmt: skip
            await stack.enter_async_context(_role(["edge", "--worker"], root / f"{name}.toml", root / f"{name}.log"))
        first = next(iter(ports.values()))

        async def host_up() -> bool:
            with contextlib.suppress(OSError, RuntimeError, IndexError, ValueError):
                return any(h["up"] for h in (await _api(first, "GET", "/v1/hosts"))["hosts"])
            return False

        await _until(host_up, 180)  # the host boots its default template first
        try:
            yield ports
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                for vm in (await _api(first, "GET", "/v1/vms"))["vms"]:
                    await _api(first, "DELETE", f"/v1/vms/{vm['id']}")


async def hop_cost(root: Path, seconds: int) -> str:
    """Section 2: p50/p99 of GET /healthz on one guest, in its namespace vs through the data port."""
    async with (
        _fleet(root / "plain", "", {"direct": True, "tunnel": False}) as ports,
        _fleet(root / "tls", "", {"tunnel-tls": False}, tls=True) as tls_ports,
    ):
        headers: dict[str, dict[str, str]] = {}
        for names, edge_ports in ((("direct", "tunnel"), ports), (("tunnel-tls",), tls_ports)):
            first = edge_ports[names[0]]
            vm = await _api(first, "POST", "/v1/vms", {"policy": {"idle_suspend_after": 3600}})
            token = (await _api(first, "POST", f"/v1/vms/{vm['id']}/tokens", {}))["token"]
            for name in names:
                headers[name] = {"Host": f"{vm['id']}.{DOMAIN}", "Authorization": f"Bearer {token}"}
        all_ports = ports | tls_ports
        results: dict[str, list[WrkResult]] = {"direct": [], "tunnel": [], "tunnel-tls": []}
        for name in results:
            await wrk(f"http://127.0.0.1:{all_ports[name]}/healthz", headers[name], HOP_CONNECTIONS, 1)
        for _ in range(3):
            for name in results:
                url = f"http://127.0.0.1:{all_ports[name]}/healthz"
                results[name].append(await wrk(url, headers[name], HOP_CONNECTIONS, seconds))
    rows = []
    for name, label in (("direct", "edge -> guest (same host, in its namespace)"),
                        ("tunnel", "edge -> host data port -> guest"),
                        ("tunnel-tls", "edge -> host data port (mutual TLS) -> guest")):  # fmt: skip
        runs = results[name]
        rows.append([label, f"{median([r.rps for r in runs]):,.0f}", f"{median([r.p50_ms for r in runs]):.2f}",
                     f"{median([r.p99_ms for r in runs]):.2f}", sum(r.errors for r in runs)])  # fmt: skip
    added50 = median([r.p50_ms for r in results["tunnel"]]) - median([r.p50_ms for r in results["direct"]])
    added99 = median([r.p99_ms for r in results["tunnel"]]) - median([r.p99_ms for r in results["direct"]])
    tls50 = median([r.p50_ms for r in results["tunnel-tls"]]) - median([r.p50_ms for r in results["tunnel"]])
    tls99 = median([r.p99_ms for r in results["tunnel-tls"]]) - median([r.p99_ms for r in results["tunnel"]])
    return "\n".join([
        "## 2. Cost of each hop (a real guest, TCG; GET /healthz)",
        "",
        f"wrk -t1 -c{HOP_CONNECTIONS} -d{seconds}s, 3 interleaved rounds (medians). Upstream connections are kept "
        "alive on both paths, so the tunnel's handshake is paid once per connection, not per request.",
        "",
        table(["path", "req/s", "p50 ms", "p99 ms", "errors"], rows),
        "",
        f"- the data-port hop adds {added50:+.2f} ms at p50 and {added99:+.2f} ms at p99",
        f"- mutual TLS on it (with the edge's local relay) adds {tls50:+.2f} ms at p50 and {tls99:+.2f} ms at p99",
    ])  # fmt: skip


async def catalog_churn(root: Path, cluster: PgCluster, vms: int) -> str:
    """Section 3: creates and wakes per second through host + edge on PostgreSQL; raw catalog writes/s."""
    url = await create_database(cluster)
    creates, wakes = [], []
    async with _fleet(root / "churn", url, {"edge": True}) as ports:
        port = ports["edge"]
        ids = []
        for _ in range(vms):
            began = time.perf_counter()
            ids.append((await _api(port, "POST", "/v1/vms", {"policy": {"idle_suspend_after": 3600}}))["id"])
            creates.append(time.perf_counter() - began)
        tokens = {i: (await _api(port, "POST", f"/v1/vms/{i}/tokens", {}))["token"] for i in ids}
        for vm_id in ids:
            await _api(port, "POST", f"/v1/vms/{vm_id}/suspend")
        for vm_id in ids:
            began = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET /healthz HTTP/1.1\r\nHost: {vm_id}.{DOMAIN}\r\nAuthorization: Bearer {tokens[vm_id]}"
                         "\r\nConnection: close\r\n\r\n".encode())  # fmt: skip
            answer = await asyncio.wait_for(reader.read(), 60)
            writer.close()
            if not answer.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"wake of {vm_id}: {answer[:200]!r}")
            wakes.append(time.perf_counter() - began)
    raw = {"PostgreSQL": await _catalog_writes(await create_database(cluster), root),
           "SQLite": await _catalog_writes("", root)}  # fmt: skip
    rows = [
        ["VM create through edge + host (PostgreSQL)", f"{1 / median(creates):.1f}", f"{median(creates) * 1000:.0f}"],
        ["wake by request through edge + host (PostgreSQL)", f"{1 / median(wakes):.1f}", f"{median(wakes) * 1000:.0f}"],
        *([f"catalog writes, {name} (create + 2 state moves + delete per VM, 4 writers)", f"{ops:,.0f}", ""]
          for name, ops in raw.items()),
    ]  # fmt: skip
    return "\n".join([
        "## 3. Catalog under churn",
        "",
        f"{vms} VMs created one after another, suspended, then each woken by one request (TCG guests: the "
        "VM work dominates, the catalog's share is a few ms). Raw writes: 4 concurrent writers for 3 s.",
        "",
        table(["operation", "per second", "median ms"], rows),
    ])  # fmt: skip


async def _catalog_writes(url: str, root: Path) -> float:
    catalog = await open_catalog(url, root / "churn.sqlite3")
    done = 0
    deadline = time.monotonic() + 3.0

    async def writer(n: int) -> None:
        nonlocal done
        i = 0
        while time.monotonic() < deadline:
            rec = VmRecord(f"w{n}x{i}", "bench", VmState.RUNNING, Policy(), 8080, time.time(), time.time())
            await catalog.create_vm(rec, "bench")
            await catalog.set_state(rec.id, [VmState.RUNNING], VmState.SUSPENDING)
            await catalog.set_state(rec.id, [VmState.SUSPENDING], VmState.SUSPENDED)
            await catalog.delete_vm(rec.id)
            done += 4
            i += 1

    try:
        await asyncio.gather(*(writer(n) for n in range(4)))
    finally:
        await catalog.close()
    return done / 3.0


async def run(rounds: int, seconds: int, vms: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="mvm-fleet-bench-", dir="/tmp"))
    cluster = PgCluster()
    try:
        cert, key = make_dev_cert(DOMAIN, root / "tls")
        cluster.start()
        print(await edge_scaling(root / "scaling", cert, key, rounds, seconds), end="\n\n", flush=True)
        print(await hop_cost(root / "hop", seconds), end="\n\n", flush=True)
        print(await catalog_churn(root, cluster, vms), flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--vms", type=int, default=8)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    uvloop.run(run(args.rounds, args.seconds, args.vms))


if __name__ == "__main__":
    main()
