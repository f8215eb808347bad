"""Edge data-plane benchmark, side by side with nginx and with no proxy at all.

1. Proxy ceiling: the edge's real protocol in front of a fast loopback upstream, so the
   proxy itself is the bottleneck (plain and TLS), next to an nginx reverse proxy.
2. Real guest: a QEMU microVM through the edge, through nginx in the VM's namespace, and
   directly from inside the namespace; requests per second and 100 MB stream speed.
3. Wake-to-first-byte: a suspended VM woken by a request through the edge.

Everything listens and loads on 127.0.0.1, or inside the VM's own network namespace;
load runs are bounded in time and connections; every process, VM, namespace and file
made here is removed at the end, also on errors and Ctrl-C.
Usage: .venv/bin/python -m bench.edge_bench [--sections 123] [--rounds 3] [--seconds 5] [--keepalive 32]
       [--guest-rounds 3] [--wakes 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import uvloop

from edge import app
from edge.proxy_context import ProxySettings
from edge.tls import make_dev_cert
from mvm.config import Config, load_config
from vmm import probe
from vmm.image import Readiness
from vmm.network import netns

from . import local_edge, nginx
from .proc_cpu import cpu_seconds, per_request_us
from .stats import median, p95, table
from .tools import WrkResult, curl, state_dir, wrk

REPO = Path(__file__).resolve().parents[1]
DOMAIN = "mvm.localhost"
PROXY_CORE = 0  # the server under test
LOAD_CORE = 1  # wrk, and the upstream when it is not the one under test
BODY = "a" * 100
CONNECTIONS = 64
LIGHT_CONNECTIONS = 4  # below saturation: latency is the proxy's own, not queueing
LIGHT_SECONDS = 3
GUEST_SECONDS = 4
GUEST_CONNECTIONS = 16
DOWNLOAD_BYTES = 100 * 1024 * 1024
DOWNLOAD_MAX_TIME = 60
NETNS_NGINX_PORT = 8443  # on the VM namespace's own loopback
DIRECT = "direct to upstream (nginx `return 200`, HTTP)"
IDLE_SECONDS = 3.0  # the edge process's CPU with no requests, before section 2's rounds
GUEST_COLUMNS = ["path", "req/s", "req/s range", "p50 ms", "p99 ms", "errors", "vs direct", "download MB/s",
                 "vs direct", "proxy CPU µs/req (range)"]  # fmt: skip


def _on(core: int) -> list[str]:
    return ["taskset", "-c", str(core)]


def _free_ports(count: int) -> list[int]:
    """Ports the kernel has just handed out on 127.0.0.1 (held together, so they differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _cpu_seconds() -> tuple[float, float, float]:
    """Busy and stolen CPU seconds of the whole machine, and ours (with reaped children).

    Between two readings, busy minus ours is what other processes ran, and steal is what the
    hypervisor withheld: the benchmark's own measure of how disturbed its numbers are on a
    shared machine. Interrupt time counts as busy: loopback traffic is charged to our
    processes but shows as softirq.
    """
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    usage = map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    own = sum(r.ru_utime + r.ru_stime for r in usage)
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick, own


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _goal(ok: bool) -> str:
    return "met" if ok else "NOT met"


def concurrency_warnings(heavy: dict[str, float], light: dict[str, float]) -> list[str]:
    """A WARNING line for each path that answers fewer req/s at -c64 (`heavy`) than at -c4 (`light`).

    A saturated proxy should do at least as much with more connections; less means some cost
    grows with concurrency (an upstream pool that closes and reopens connections did so once).
    """
    return [
        f"WARNING: {name}: {heavy[name]:,.0f} req/s at -c{CONNECTIONS} is below {light[name]:,.0f} at "
        f"-c{LIGHT_CONNECTIONS}: some per-connection or per-request cost grows with concurrency"
        for name in heavy
        if name in light and heavy[name] < light[name]
    ]


async def _expect_200(url: str, args: Sequence[str], prefix: Sequence[str] = ()) -> None:
    """Fail early and clearly (a 401 at 50k req/s would look like a fast proxy)."""
    status, _, _ = await curl(url, args, 10, prefix)
    if status != 200:
        raise RuntimeError(f"GET {url} answered {status}, not 200")


def _header_args(headers: dict[str, str]) -> list[str]:
    return [arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]


async def proxy_ceiling(root: Path, cert: Path, key: Path, rounds: int, seconds: int, keepalive: int) -> str:
    """Section 1: the same wrk load on the upstream, nginx in front of it, and the edge."""
    up_port, http_port, tls_port = _free_ports(3)
    cpu_before, began = _cpu_seconds(), time.perf_counter()
    async with contextlib.AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(
            nginx.running(root / "upstream", nginx.fixed_answer(up_port, BODY), _on(LOAD_CORE), master=False)
        )
        proxy = nginx.reverse_proxy(
            f"127.0.0.1:{up_port}", keepalive, [(http_port, False), (tls_port, True)], cert, key
        )
        nginx_proxy = await stack.enter_async_context(nginx.running(root / "nginx-proxy", proxy, _on(PROXY_CORE)))
        edge = await stack.enter_async_context(
            local_edge.running(up_port, cert, key, keepalive, root / "local-edge.log", _on(PROXY_CORE))
        )
        headers = {"Host": edge.host, "Authorization": f"Bearer {edge.token}"}
        targets = {
            DIRECT: f"http://127.0.0.1:{up_port}/",
            "nginx reverse proxy, HTTP": f"http://127.0.0.1:{http_port}/",
            "edge, HTTP": f"http://127.0.0.1:{edge.http_port}/",
            "nginx reverse proxy, TLS": f"https://127.0.0.1:{tls_port}/",
            "edge, TLS": f"https://127.0.0.1:{edge.tls_port}/",
        }
        for url in targets.values():
            # -k: like wrk, which never verifies; this only checks the status.
            await _expect_200(url, ["-k", *_header_args(headers)])
            await wrk(url, headers, CONNECTIONS, 1, _on(LOAD_CORE))  # warm-up: pools, token cache

        # The server under test in each row, whose CPU per request is counted: the upstream itself
        # in the direct row, else the proxy (nginx's master and its worker, or the edge's process).
        servers: dict[str, tuple[int, ...]] = {
            name: (upstream.pid,) if name == DIRECT else (nginx_proxy.pid,) for name in targets
        }
        servers["edge, HTTP"] = servers["edge, TLS"] = edge.pids
        cpu_us: dict[str, list[float]] = {name: [] for name in targets}
        core_share: dict[str, list[float]] = {name: [] for name in targets}  # of one core, over the run

        async def load(name: str, connections: int, duration: int) -> WrkResult:
            os.sched_setaffinity(upstream.pid, {PROXY_CORE if name == DIRECT else LOAD_CORE})
            before, started = sum(map(cpu_seconds, servers[name])), time.perf_counter()
            result = await wrk(targets[name], headers, connections, duration, _on(LOAD_CORE))
            used = sum(map(cpu_seconds, servers[name])) - before
            per_request = per_request_us(used, result.requests)
            if per_request is not None and connections == CONNECTIONS:
                cpu_us[name].append(per_request)
                core_share[name].append(used / (time.perf_counter() - started))
            return result

        runs: dict[str, list[WrkResult]] = {name: [] for name in targets}
        for _ in range(rounds):  # interleaved, so drift on a shared machine hits every row alike
            for name in targets:
                runs[name].append(await load(name, CONNECTIONS, seconds))
        light = {name: await load(name, LIGHT_CONNECTIONS, LIGHT_SECONDS) for name in targets}
    cpu_after, elapsed = _cpu_seconds(), time.perf_counter() - began
    busy, steal, own = (after - before for after, before in zip(cpu_after, cpu_before, strict=True))

    def rps(name: str) -> float:
        return median([r.rps for r in runs[name]])

    def p99(name: str) -> float:
        return median([r.p99_ms for r in runs[name]])

    def cpu(name: str) -> str:
        return f"{median(cpu_us[name]):.1f} ({median(core_share[name]):.0%})" if cpu_us[name] else "?"

    rows: list[list[object]] = []
    for name, results in runs.items():
        listener = "TLS" if name.endswith("TLS") else "HTTP"
        vs_nginx = f"{rps(name) / rps(f'nginx reverse proxy, {listener}'):.2f}" if name != DIRECT else ""
        spread = f"{min(r.rps for r in results):,.0f}-{max(r.rps for r in results):,.0f}"
        p50 = median([r.p50_ms for r in results])
        errors = sum(r.errors for r in results)
        rows.append([name, f"{rps(name):,.0f}", spread, _ms(p50), _ms(p99(name)), errors, vs_nginx, cpu(name)])
    light_rows = [
        [name, f"{r.rps:,.0f}", _ms(r.p50_ms), _ms(r.p99_ms), r.errors, f"{r.p99_ms - light[DIRECT].p99_ms:+.2f}"]
        for name, r in light.items()
    ]
    edges = [f"edge, {listener}" for listener in ("HTTP", "TLS")]
    goals = concurrency_warnings({name: rps(name) for name in edges}, {name: light[name].rps for name in edges})
    for listener in ("HTTP", "TLS"):
        ratio = rps(f"edge, {listener}") / rps(f"nginx reverse proxy, {listener}")
        added = p99(f"edge, {listener}") - p99(DIRECT)
        added_light = light[f"edge, {listener}"].p99_ms - light[DIRECT].p99_ms
        goals.append(f"- edge / nginx, {listener}: {ratio:.2f} (goal ≥ 0.5: {_goal(ratio >= 0.5)})")
        edge_cpu, nginx_cpu = cpu_us[f"edge, {listener}"], cpu_us[f"nginx reverse proxy, {listener}"]
        if edge_cpu and nginx_cpu:
            goals.append(
                f"- CPU per request, {listener}: edge {median(edge_cpu):.1f} µs, nginx {median(nginx_cpu):.1f} µs "
                f"({median(edge_cpu) / median(nginx_cpu):.2f} of nginx)"
            )
        goals.append(
            f"- edge p99 - direct p99, {listener}: {added:+.2f} ms at -c{CONNECTIONS}, {added_light:+.2f} ms at "
            f"-c{LIGHT_CONNECTIONS} (goal < 2 ms: {_goal(added < 2)} / {_goal(added_light < 2)})"
        )
    return "\n".join(
        [
            "## 1. Proxy ceiling (fast upstream, 100-byte answer)",
            "",
            f"wrk -t1 -c{CONNECTIONS} -d{seconds}s on core {LOAD_CORE}; the proxy under test alone on core "
            f"{PROXY_CORE} (1 nginx worker, or the edge's protocol in its own uvloop process); the upstream "
            f"on core {LOAD_CORE}, on core {PROXY_CORE} for the direct row. Every row sends the same Host and "
            f"Bearer token; the edge verifies it per request. Both proxies keep up to {keepalive} idle upstream "
            f"connections (`--keepalive`; the edge's default per VM is {ProxySettings().upstream_keepalive_per_vm}). "
            f"{rounds} interleaved rounds: req/s, p50 and p99 are medians over rounds, the range shows the noise.",
            "",
            table(
                ["path", "req/s", "req/s range", "p50 ms", "p99 ms", "errors", "vs nginx", "CPU µs/req (busy)"], rows
            ),
            "",
            "CPU µs/req: user plus system CPU time of the server under test (the proxy; the upstream in the "
            "direct row) over each run, from /proc, divided by the requests wrk counted; median over rounds. "
            "Busy: that CPU time as a share of one core over the run; well below 100% means the row was held "
            "back by something else than the server's own work (the load core, other processes). Other "
            "processes move CPU per request less than req/s, but a busier server pays less per request (more "
            "events per wake-up): compare rows of a similar busy share.",
            "",
            f"Every row above is saturated, so its latency is mostly queueing (mean ≈ {CONNECTIONS} / req/s) and "
            f"the added p99 follows the req/s gap. Below saturation, one wrk -c{LIGHT_CONNECTIONS} -d{LIGHT_SECONDS}s "
            "run each shows the proxies' own delay:",
            "",
            table(["path", "req/s", "p50 ms", "p99 ms", "errors", "p99 added over direct, ms"], light_rows),
            "",
            *goals,
            "",
            f"Disturbance: other processes used {busy - own:.1f} CPU-seconds during these {elapsed:.0f} s "
            f"({(busy - own) / elapsed:.0%} of one core) and the hypervisor withheld {steal:.1f} s (steal); "
            "well above 0 means these numbers are not the machine's best.",
        ]
    )


def _edge_config(state: Path, cert: Path, key: Path) -> Config:
    """The built-in defaults on an ephemeral 127.0.0.1 port, with a fresh state dir and the dev cert."""
    cfg = load_config(None)
    return replace(
        cfg,
        server=replace(cfg.server, listen_port=0, tls=True, tls_cert=cert, tls_key=key),
        vmm=replace(cfg.vmm, state_dir=state),
        log=replace(cfg.log, level="warning"),
    )


async def real_guest(root: Path, cert: Path, key: Path, plan: Plan) -> None:
    """Sections 2 and 3 (those in `plan`) on one edge and one VM; prints each section when it is done."""
    state = state_dir(root / "state")
    started = time.perf_counter()
    edge = await app.start(_edge_config(state, cert, key))  # makes the default template (a boot)
    vm_id = None
    try:
        startup = time.perf_counter() - started
        vm_id = (await edge.manager.create_vm()).id
        await probe.wait_ready(vm_id, Readiness("http", 8080, "/healthz"), 60, lambda: True)
        token, _ = edge.ctx.tokens.issue(vm_id)
        if 2 in plan.sections:
            guest = await _guest_paths(edge, vm_id, token, root, cert, key, startup, plan.guest_rounds)
            print(guest, end="\n\n", flush=True)
        if 3 in plan.sections:
            print(await _wake_to_first_byte(edge, vm_id, token, cert, plan.wakes), flush=True)
    finally:
        try:
            for rec in list(edge.manager.list_vms()):
                await edge.manager.delete(rec.id)
        finally:
            await app.stop(edge)
            if vm_id is not None and netns.exists(vm_id):
                await netns.delete(vm_id)


@dataclass(frozen=True)
class GuestPath:
    """One way to the guest in section 2: how wrk and curl reach it, and whose CPU is its cost."""

    name: str
    prefix: list[str]  # command prefix: `ip netns exec` for the paths inside the VM's namespace
    url: str  # for wrk
    headers: dict[str, str]
    curl_url: str
    curl_args: list[str]
    proxy: str = ""  # "edge" or "nginx": the process whose CPU per request is counted


def guest_goals(rps: dict[str, list[float]], cpu_us: dict[str, list[float]]) -> list[str]:
    """Issue 15's two goals for the edge against nginx in front of one guest, from interleaved rounds.

    Each round's edge and nginx runs follow each other, so their ratio is taken per round (the guest's
    own speed drifts between rounds by a third) and the median of those ratios is the figure.
    """
    rps_ratios = [e / n for e, n in zip(rps["edge"], rps["nginx"], strict=True) if n]
    cpu_ratios = [e / n for e, n in zip(cpu_us["edge"], cpu_us["nginx"], strict=True) if n]
    lines = []
    if rps_ratios:
        ratio = median(rps_ratios)
        lines.append(
            f"- edge / nginx req/s: {ratio:.2f}, median of the rounds' ratios "
            f"({', '.join(f'{r:.2f}' for r in rps_ratios)}) (goal ≥ 0.95: {_goal(ratio >= 0.95)})"
        )
    if cpu_ratios:
        ratio = median(cpu_ratios)
        lines.append(
            f"- CPU per request: edge {median(cpu_us['edge']):.1f} µs, nginx {median(cpu_us['nginx']):.1f} µs "
            f"(medians); edge / nginx {ratio:.2f}, median of the rounds' ratios "
            f"({', '.join(f'{r:.2f}' for r in cpu_ratios)}) (goal ≤ 1.5: {_goal(ratio <= 1.5)})"
        )
    return lines or ["- edge / nginx: not measured (no requests counted)"]


async def _guest_paths(
    edge: app.Edge, vm_id: str, token: str, root: Path, cert: Path, key: Path, startup: float, rounds: int
) -> str:
    """Section 2: interleaved wrk rounds and a 100 MB download on the three ways to the guest."""
    in_ns = ["ip", "netns", "exec", netns.ns_name(vm_id)]
    host = f"{vm_id}.{edge.cfg.server.domain}"
    tls = ["--cacert", str(cert)]
    keepalive = edge.cfg.proxy.upstream_keepalive_per_vm
    ns_proxy = nginx.reverse_proxy(f"{netns.GUEST_IP}:8080", keepalive, [(NETNS_NGINX_PORT, True)], cert, key)
    paths = [
        GuestPath("direct to guest (in the VM netns, HTTP)", in_ns, f"http://{netns.GUEST_IP}:8080", {},
                  f"http://{netns.GUEST_IP}:8080", []),
        GuestPath("edge (TLS, token check)", [], f"https://127.0.0.1:{edge.port}",
                  {"Host": host, "Authorization": f"Bearer {token}"},
                  f"https://{host}:{edge.port}", [*tls, "--resolve", f"{host}:{edge.port}:127.0.0.1"], "edge"),
        GuestPath("nginx in the VM netns (TLS, upstream keepalive)", in_ns, f"https://127.0.0.1:{NETNS_NGINX_PORT}",
                  {"Host": host}, f"https://{host}:{NETNS_NGINX_PORT}",
                  [*tls, "--resolve", f"{host}:{NETNS_NGINX_PORT}:127.0.0.1"], "nginx"),
    ]  # fmt: skip
    runs: dict[str, list[WrkResult]] = {path.name: [] for path in paths}
    cpu_us: dict[str, list[float]] = {"edge": [], "nginx": []}
    speeds: dict[str, float] = {}
    async with nginx.running(root / "nginx-netns", ns_proxy, in_ns) as ns_nginx:

        def proxy_cpu(proxy: str) -> float:
            """The proxy's CPU seconds so far: this process's own for the edge (it runs here; QEMU,
            wrk and curl are its children and not counted), nginx's master and worker."""
            if proxy == "edge":
                return cpu_seconds(os.getpid(), children=False)
            return cpu_seconds(ns_nginx.pid)

        def curl_args(path: GuestPath) -> list[str]:
            return [*path.curl_args, *_header_args({k: v for k, v in path.headers.items() if k != "Host"})]

        for path in paths:  # warm-up: the edge's pool and token cache, nginx's upstream keepalive
            await _expect_200(f"{path.curl_url}/healthz", curl_args(path), path.prefix)
            await wrk(f"{path.url}/healthz", path.headers, GUEST_CONNECTIONS, 1, path.prefix)
        before = time.process_time()  # all this process's threads, to the ns: /proc counts 10 ms ticks
        await asyncio.sleep(IDLE_SECONDS)
        idle_ms = (time.process_time() - before) / IDLE_SECONDS * 1000
        for _ in range(rounds):  # interleaved: the guest's own speed drifts, and hits every path alike
            for path in paths:
                before = proxy_cpu(path.proxy) if path.proxy else 0.0
                result = await wrk(f"{path.url}/healthz", path.headers, GUEST_CONNECTIONS, GUEST_SECONDS, path.prefix)
                runs[path.name].append(result)
                used = per_request_us(proxy_cpu(path.proxy) - before, result.requests) if path.proxy else None
                if used is not None:
                    cpu_us[path.proxy].append(used)
        for path in paths:
            status, size, speed = await curl(
                f"{path.curl_url}/download?bytes={DOWNLOAD_BYTES}", curl_args(path), DOWNLOAD_MAX_TIME, path.prefix
            )
            if status != 200 or size != DOWNLOAD_BYTES:
                raise RuntimeError(f"{path.name}: download answered {status} with {size} bytes")
            speeds[path.name] = speed
    direct = paths[0].name
    rows: list[list[object]] = []
    for path in paths:
        results = runs[path.name]
        rps = median([r.rps for r in results])
        proxy_us = cpu_us.get(path.proxy, [])
        rows.append(
            [path.name, f"{rps:,.0f}", f"{min(r.rps for r in results):,.0f}-{max(r.rps for r in results):,.0f}",
             _ms(median([r.p50_ms for r in results])), _ms(median([r.p99_ms for r in results])),
             sum(r.errors for r in results),
             f"{median([r.rps / d.rps for r, d in zip(results, runs[direct], strict=True) if d.rps]):.2f}",
             f"{speeds[path.name] / 1e6:.0f}", f"{speeds[path.name] / speeds[direct]:.2f}",
             f"{median(proxy_us):.1f} ({min(proxy_us):.0f}-{max(proxy_us):.0f})" if proxy_us else ""]
        )  # fmt: skip
    proxied = {proxy: [r.rps for r in runs[path.name]] for path in paths if (proxy := path.proxy)}
    edge_rps = median(proxied["edge"])
    return "\n".join(
        [
            "## 2. Real guest",
            "",
            f"accelerator: {edge.manager.accel.name}; edge start-up incl. the default template: {startup:.1f} s. "
            f"`GET /healthz` with wrk -t1 -c{GUEST_CONNECTIONS} -d{GUEST_SECONDS}s (nothing pinned: QEMU needs "
            f"a core), {rounds} interleaved rounds: req/s, p50, p99, vs direct (each round's ratio) and CPU are "
            f"medians over rounds, the ranges show the noise; then one {DOWNLOAD_BYTES // 2**20} MiB `/download` "
            "with curl on each path (MB = 10^6 bytes).",
            "",
            table(GUEST_COLUMNS, rows),
            "",
            "Proxy CPU µs/req: user plus system time of the proxy over each wrk run, from /proc, divided by the "
            "requests wrk counted. The edge's figure is this whole process's: it also runs the VM manager, "
            f"which used {idle_ms:.1f} ms of CPU a second with no request at all ({IDLE_SECONDS:g} s measured "
            f"before the rounds), {idle_ms / edge_rps * 1000 if edge_rps else 0:.1f} µs of each request's "
            "figure at the edge's median rate.",
            "",
            *guest_goals(proxied, cpu_us),
            "",
            "The guest is the bottleneck here"
            + (" (TCG: every guest instruction is translated)" if edge.manager.accel.name == "tcg" else "")
            + ": these rows compare paths to one slow server, not proxies; section 1 is the proxy ceiling. "
            f"With {os.cpu_count()} cores, a proxy's CPU is also taken from QEMU's, so a costlier proxy slows "
            "the guest too.",
        ]
    )


async def _wake_to_first_byte(edge: app.Edge, vm_id: str, token: str, cert: Path, cycles: int) -> str:
    """Section 3: suspend, then time one request through the edge from sending to its first byte."""
    host = f"{vm_id}.{edge.cfg.server.domain}"
    ssl_ctx = ssl.create_default_context(cafile=str(cert))
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    registry = edge.ctx.metrics.registry

    def waited() -> float:
        return registry.get_sample_value("mvm_wake_seconds_sum", {}) or 0.0

    first_byte: list[float] = []
    restore: list[float] = []
    suspend: list[float] = []
    for cycle in range(cycles + 1):  # cycle 0 warms up: a clone's first suspend moves its RAM to its own file
        t0 = time.perf_counter()
        await edge.manager.suspend(vm_id)
        took_suspend = time.perf_counter() - t0
        before = waited()
        async with asyncio.timeout(60):
            # Connected and TLS done first: the clock covers what a wake adds, not the handshake.
            reader, writer = await asyncio.open_connection("127.0.0.1", edge.port, ssl=ssl_ctx, server_hostname=host)
            try:
                t0 = time.perf_counter()
                writer.write(request.encode())
                first = await reader.read(1)
                took = time.perf_counter() - t0
                answer = first + await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
        if not answer.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"wake cycle {cycle}: {answer[:200]!r}")
        if cycle:
            first_byte.append(took)
            restore.append(waited() - before)
            suspend.append(took_suspend)

    def row(name: str, values: list[float]) -> list[object]:
        return [name, len(values), _ms(median(values) * 1000), _ms(p95(values) * 1000), _ms(max(values) * 1000)]

    return "\n".join(
        [
            "## 3. Wake-to-first-byte (through the edge, TLS already set up)",
            "",
            table(
                ["step", "n", "median ms", "p95 ms", "max ms"],
                [
                    row("request sent → first response byte (VM suspended)", first_byte),
                    row("… of which the edge waited for the wake (manager restore → cont)", restore),
                    row("suspend via the manager (for reference)", suspend),
                ],
            ),
            "",
            "The rest of the first byte's time is the restored guest answering its first request"
            + (" (TCG re-translates guest code in the new QEMU process)." if edge.manager.accel.name == "tcg" else "."),
        ]
    )


@dataclass(frozen=True)
class Plan:
    """What one run measures, from the command line (each bounded there)."""

    sections: frozenset[int]
    rounds: int  # section 1's interleaved rounds
    seconds: int  # section 1's wrk runs
    keepalive: int
    guest_rounds: int  # section 2's interleaved rounds
    wakes: int  # section 3's cycles


async def run(plan: Plan) -> None:
    for tool in ("wrk", "nginx", "curl", "taskset", "ip"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs at least 2 cores: one for the proxy under test, one for the load")
    root = Path(tempfile.mkdtemp(prefix="mvme-", dir="/tmp"))  # short: QMP socket paths stay < 108 bytes
    try:
        cert, key = make_dev_cert(DOMAIN, root / "tls")
        began = time.perf_counter()
        if 1 in plan.sections:
            ceiling = await proxy_ceiling(root, cert, key, plan.rounds, plan.seconds, plan.keepalive)
            print(ceiling, end="\n\n", flush=True)
        if plan.sections & {2, 3}:
            await real_guest(root, cert, key, plan)
        print(f"\n(whole run: {time.perf_counter() - began:.0f} s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="123", help="which sections to run, e.g. 2 or 13 (default: all)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of section 1")
    parser.add_argument("--seconds", type=int, default=5, help="length of each section 1 wrk run")
    parser.add_argument(
        "--keepalive",
        type=int,
        default=ProxySettings().upstream_keepalive_per_vm,
        help="idle upstream connections each proxy keeps in section 1 (default: the edge's own default)",
    )
    parser.add_argument("--guest-rounds", type=int, default=3, help="interleaved rounds of section 2")
    parser.add_argument("--wakes", type=int, default=20, help="suspend/wake cycles of section 3")
    args = parser.parse_args()
    sections = frozenset(int(c) for c in args.sections if c in "123")
    if not sections:
        parser.error("--sections: name one or more of 1, 2 and 3")
    plan = Plan(
        sections,
        max(1, min(args.rounds, 5)),
        max(1, min(args.seconds, 10)),
        max(1, min(args.keepalive, 1024)),
        max(1, min(args.guest_rounds, 7)),
        max(1, min(args.wakes, 100)),
    )
    uvloop.run(run(plan))


if __name__ == "__main__":
    main()
