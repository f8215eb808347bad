"""HTTP/2 through the edge against nginx (http2 on), both in front of the same upstream.

`python -m bench.h2_bench [--requests N]`. h2load (nghttp2-client) over TLS with ALPN h2 at
-m 10 and -m 100 streams per connection, with h2load's one URL again and again and with 1,000
distinct paths whose answers differ (nothing for the edge's repeat paths to take); the proxy
under test alone on one core (one nginx worker, or the edge's protocol in its own uvloop
process), h2load and the upstream on the other, so req/s is per core, and each proxy's CPU time
over the run (/proc/<pid>/stat) per request. Then the same requests through the edge's HTTP/2
session alone, without I/O (bench.h2_alone): its share of the edge's CPU, beside python-hyper's
h2 that the edge used before, and HPACK alone (bench.hpack_alone): hpack in Python against
libnghttp2's, the edge's. Then a browser-like page of 50 small resources: HTTP/2 (one
connection, 50 streams) against HTTP/1.1 (6 connections, one request at a time each), through
the edge. Prints a Markdown report; the lead re-measures on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import uvloop

from edge.tls import make_dev_cert

from . import h2_alone, hpack_alone, local_edge, nginx
from .edge_bench import BODY, LOAD_CORE, PROXY_CORE, _free_ports, _on
from .proc_cpu import cpu_seconds
from .stats import median, table
from .tools import run

KEEPALIVE = 32
DISTINCT_PATHS = 1000  # "distinct": h2load cycles through this many paths, and each path's answer names it
PAGE_RESOURCES = 50
PAGE_ROUNDS = 20
_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed")


async def h2load(url: str, authority: str, token: str, args: Sequence[str]) -> tuple[float, float, int]:
    """(req/s, seconds, failed) of one h2load run on the load core."""
    argv = [*_on(LOAD_CORE), "h2load", "-t1", *args, "-H", f":authority: {authority}",
            "-H", f"authorization: Bearer {token}", url]  # fmt: skip
    code, out = await run(argv, timeout=300)
    finished, requests = _FINISHED.search(out), _REQUESTS.search(out)
    if code != 0 or finished is None or requests is None:
        raise RuntimeError(f"h2load failed ({code}): {out[-1500:]}")
    seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    return float(finished.group(3)), seconds, int(requests.group(3))


async def bench(requests: int) -> str:
    up_port, tls_port = _free_ports(2)
    with tempfile.TemporaryDirectory(prefix="mvm-h2-bench-") as d:
        root = Path(d)
        cert, key = make_dev_cert("mvm.localhost", root / "tls")
        async with contextlib.AsyncExitStack() as stack:
            upstream = nginx.fixed_answer(up_port, BODY, name_the_path=True)
            await stack.enter_async_context(nginx.running(root / "upstream", upstream, _on(LOAD_CORE), master=False))
            proxy = nginx.reverse_proxy(f"127.0.0.1:{up_port}", KEEPALIVE, [(tls_port, True)], cert, key, http2=True)
            nginx_proxy = await stack.enter_async_context(
                nginx.running(root / "nginx-proxy", proxy, _on(PROXY_CORE), master=False)
            )
            edge = await stack.enter_async_context(
                local_edge.running(up_port, cert, key, KEEPALIVE, root / "local-edge.log", _on(PROXY_CORE))
            )
            targets = {
                "nginx (http2 on)": (nginx_proxy.pid, f"https://127.0.0.1:{tls_port}/"),
                "edge": (edge.pids[0], f"https://127.0.0.1:{edge.tls_port}/"),
            }
            paths = {
                name: _paths_file(root / f"paths-{n}.txt", url) for n, (name, (_, url)) in enumerate(targets.items())
            }
            rows = []
            ratios = []
            for streams in (10, 100):
                for requests_are in ("the same", "distinct"):
                    rps, cpu = {}, {}
                    for name, (pid, url) in targets.items():
                        each = ["-c", "4", "-m", str(streams)]
                        if requests_are == "distinct":
                            each += ["-i", str(paths[name])]
                        await h2load(url, edge.host, edge.token, ["-n", "2000", *each])  # warm-up
                        before = cpu_seconds(pid, children=False)
                        rate, _, failed = await h2load(url, edge.host, edge.token, ["-n", str(requests), *each])
                        rps[name], cpu[name] = rate, (cpu_seconds(pid, children=False) - before) / requests * 1e6
                        rows.append([f"-m {streams}", requests_are, name, f"{rate:,.0f}", f"{cpu[name]:.0f}", failed])
                    nginx_name = "nginx (http2 on)"
                    ratios.append(
                        f"- edge / nginx at -m {streams}, {requests_are} requests: "
                        f"{rps['edge'] / rps[nginx_name]:.2f} req/s (goal ≥ 0.6), "
                        f"{cpu['edge'] / cpu[nginx_name]:.1f} times the CPU per request"
                    )
            page = []
            for label, args in (
                ("HTTP/2: 1 connection, 50 streams", ["-c", "1", "-m", str(PAGE_RESOURCES)]),
                ("HTTP/1.1: 6 connections", ["--h1", "-c", "6", "-m", "1"]),
            ):
                times = []
                for _ in range(PAGE_ROUNDS):
                    _, seconds, failed = await h2load(
                        targets["edge"][1], edge.host, edge.token, [*args, "-n", str(PAGE_RESOURCES)]
                    )
                    assert failed == 0
                    times.append(seconds * 1000)
                page.append([label, f"{median(times):.1f}", f"{min(times):.1f}-{max(times):.1f}"])
    return "\n".join(
        [
            "## HTTP/2: the edge against nginx (fast upstream, 100-byte answer, TLS + ALPN h2)",
            "",
            f"h2load -t1 -c4 -n{requests} on core {LOAD_CORE}; the proxy alone on core {PROXY_CORE} (req/s per core).",
            "",
            "Requests: \"the same\" is h2load's one URL again and again (the edge's repeat paths take it: a",
            "header list and a guest answer seen again); \"distinct\" cycles through "
            f"{DISTINCT_PATHS:,} paths whose answers differ (each names its path), so nothing repeats.",
            "",
            table(["streams", "requests", "proxy", "req/s", "CPU µs/request", "failed"], rows),
            "",
            *ratios,
            "",
            h2_alone.bench(min(requests, 10_000)),
            "",
            hpack_alone.bench(min(requests, 20_000)),
            "",
            f"A page of {PAGE_RESOURCES} small resources through the edge, ms for all of them ({PAGE_ROUNDS} rounds):",
            "",
            table(["protocol", "median ms", "range ms"], page),
        ]
    )


def _paths_file(path: Path, url: str) -> Path:
    """h2load's -i file: DISTINCT_PATHS URLs on `url`'s origin, one path each."""
    path.write_text("".join(f"{url}p/{n}\n" for n in range(DISTINCT_PATHS)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=50_000, help="requests per h2load run")
    args = parser.parse_args()
    print(uvloop.run(bench(args.requests)))


if __name__ == "__main__":
    main()
