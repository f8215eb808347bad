"""What sharing counts across edge workers costs per connection and per request.

1. Per-IP accounting, one client connection opened then closed (`ProxyContext.client_opened`
   + `client_closed`, the accept path): a worker on its own (a dict) against the set's shared
   table (`edge.shared_ips`: flock, keyed hash, regions of 2 and 8 workers), alone and with
   a second process doing the same at once (lock contention).
2. Metrics bumped per proxied request (`request`, `proxied`) and per connection
   (`client_connections` twice): plain values against prometheus_client's multiprocess files,
   written at each update or batched (`Metrics.flush_every`, what a worker of a set does).

Everything runs in a temporary directory on this machine; nothing listens.
Usage: .venv/bin/python -m bench.shared_state_bench [--n 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from edge.metrics import Metrics
from edge.proxy_context import ProxyContext
from edge.shared_ips import SharedIpTable, slots_for


def _context(table: SharedIpTable | None) -> ProxyContext:
    # Only the per-IP counts and the metrics are exercised; the rest is never touched.
    none = cast(Any, None)
    ctx = ProxyContext(backend=none, router=none, tokens=none, metrics=Metrics(), pool=none, control_socket="")
    ctx.shared_ips = table
    return ctx


def connections(n: int, table: SharedIpTable | None, rounds: int = 3) -> float:
    """Microseconds per connection opened and closed (64 addresses in turn, each new at its
    open: the dearest case, a key to hash and a slot to find), best of `rounds`."""
    ctx = _context(table)
    clients = [f"198.51.100.{i}".encode() for i in range(64)]
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(n):
            client = clients[i & 63]
            ctx.client_opened(client)
            ctx.client_closed(client)
        best = min(best, (time.perf_counter() - started) / n * 1e6)
    return best


def bumps(n: int, batched: bool = False) -> float:
    """Microseconds per request's metric updates (+ a connection's open and close)."""

    async def run() -> float:
        metrics = Metrics()
        if batched:
            metrics.flush_every(1.0)
        started = time.perf_counter()
        for _ in range(n):
            metrics.client_connections(1)
            metrics.request(200)
            metrics.proxied(300, 1200)
            metrics.client_connections(-1)
        metrics.stop_flushing()
        return (time.perf_counter() - started) / n * 1e6

    return min(asyncio.run(run()) for _ in range(3))


def _child(mode: str, n: int, path: str) -> None:
    if mode.startswith("metrics"):
        print(f"{bumps(n, mode == 'metrics-batched'):.3f}", flush=True)
        return
    table = SharedIpTable(Path(path))
    assert table.claim(os.getpid())
    sys.stdin.readline()  # start together
    print(f"{connections(n, table):.3f}", flush=True)


def _run_children(count: int, mode: str, n: int, path: str, env: dict[str, str] | None = None) -> list[float]:
    procs = [
        subprocess.Popen([sys.executable, "-m", "bench.shared_state_bench", "--child", mode, "--n", str(n),
                          "--path", path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(count)
    ]  # fmt: skip
    try:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return [float(proc.communicate()[0]) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--child", default="")
    parser.add_argument("--path", default="")
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.n, args.path)
        return
    with tempfile.TemporaryDirectory(prefix="mvm-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as d:
        print("per-IP accounting, one connection opened + closed (us):")
        print(f"  one worker, dict only           {connections(args.n, None):7.2f}")
        for regions in (2, 8):
            path = Path(d) / f"t{regions}"
            table = SharedIpTable.create(path, regions, slots_for(65536))
            assert table.claim(os.getpid())
            print(f"  shared table, {regions} regions        {connections(args.n, table):7.2f}")
            table.release()
            table.close()
        two = _run_children(2, "table", args.n, str(Path(d) / "t2"))
        print(f"  shared table, 2 processes at once {' / '.join(f'{t:.2f}' for t in two)}")
        print("metrics per request (request + proxied + a connection's gauge up and down) (us):")
        print(f"  plain values                    {bumps(args.n):7.2f}")
        multi = Path(d) / "metrics"
        multi.mkdir()
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multi)}
        print(f"  multiprocess files              {_run_children(1, 'metrics', args.n, '', env)[0]:7.2f}")
        print(f"  multiprocess files, batched     {_run_children(1, 'metrics-batched', args.n, '', env)[0]:7.2f}")


if __name__ == "__main__":
    main()
