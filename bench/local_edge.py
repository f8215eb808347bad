"""The edge's real data plane in front of a loopback upstream instead of a guest.

`python -m bench.local_edge --upstream-port N --cert C --key K` serves the edge's own
protocol factory (routing, token check, head rewrite, upstream keep-alive pool) on two
127.0.0.1 listeners, plain and TLS, with a backend whose one VM is always running and
whose "guest" is 127.0.0.1:N. That isolates the proxy's cost from QEMU's (TCG here).
It prints one JSON line (ports, VM id, a token for it) and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import uvloop

from edge.h2_conn import make_listener_factory
from edge.hostnames import HostnameRouter
from edge.http1 import make_protocol_factory
from edge.metrics import Metrics
from edge.proxy_context import ProxyContext, ProxySettings
from edge.settings import token_service
from edge.tls import server_context
from edge.upstream import UpstreamPool
from mvm.config import load_config
from vmm import jsonlog
from vmm.model import VmRecord, VmState
from vmm.policy import Policy

from .tools import stop

VM_ID = "benchvm1"
GUEST_PORT = 8080


class LoopbackBackend:
    """A VmBackend with one VM that is always running and lives at 127.0.0.1:`upstream_port`."""

    def __init__(self, upstream_port: int) -> None:
        now = time.time()
        self.record = VmRecord(VM_ID, "bench", VmState.RUNNING, Policy(), GUEST_PORT, now, now)
        self.upstream_port = upstream_port

    def lookup(self, vm_id: str) -> VmRecord | None:
        return self.record if vm_id == VM_ID else None

    async def ensure_running(self, vm_id: str) -> bool:
        return False

    async def confirm_running(self, vm_id: str) -> bool:
        return False

    async def open_upstream(self, vm_id: str, port: int, timeout: float) -> socket.socket:
        """Like vmm.network.netns.connect_guest (non-blocking, TCP_NODELAY), minus the namespace."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.upstream_port))
        except BaseException:
            sock.close()
            raise
        return sock

    def touch(self, vm_id: str, at: float | None = None) -> None:
        return None


@dataclass(frozen=True)
class LocalEdge:
    """What the benchmark needs from the child: where it listens and how to get in."""

    http_port: int
    tls_port: int
    host: str  # the VM's host name, for the Host header
    token: str
    pids: tuple[int, ...]  # the worker processes, for their CPU time


async def _serve(upstream_port: int, cert: Path, key: Path, keepalive: int, ports: tuple[int, int]) -> None:
    cfg = load_config(None)  # the dev token key: the parent never needs it, the child issues the token
    jsonlog.configure("warning")
    tokens = token_service(cfg.tokens)
    ctx = ProxyContext(
        backend=LoopbackBackend(upstream_port),
        router=HostnameRouter(cfg.server.domain, cfg.server.control_host),
        tokens=tokens,
        metrics=Metrics(),
        pool=UpstreamPool(keepalive, cfg.proxy.upstream_keepalive_idle),
        control_socket="",  # no control API here: the control host is never asked for
        settings=ProxySettings(),
    )
    loop = asyncio.get_running_loop()
    # reuse_port: several of these processes may share the two ports, as `mvm edge --workers` does.
    plain = await loop.create_server(
        make_protocol_factory(ctx, "http"), "127.0.0.1", ports[0], backlog=1024, reuse_port=True
    )
    tls = await loop.create_server(
        # TLS offers h2 and http/1.1 by ALPN, as the edge's own listener does.
        make_listener_factory(ctx, True, "https"),
        "127.0.0.1",
        ports[1],
        ssl=server_context(cert, key, h2=True),
        backlog=1024,
        reuse_port=True,
    )
    token, _ = tokens.issue(VM_ID, ttl=cfg.tokens.max_ttl)
    bound = [int(server.sockets[0].getsockname()[1]) for server in (plain, tls)]
    host = f"{VM_ID}.{cfg.server.domain}"
    print(json.dumps({"http_port": bound[0], "tls_port": bound[1], "host": host, "token": token}), flush=True)
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    plain.close()
    tls.close()
    ctx.pool.close()


@contextlib.asynccontextmanager
async def running(
    upstream_port: int,
    cert: Path,
    key: Path,
    keepalive: int,
    log: Path,
    prefix: Sequence[str] = (),
    workers: int = 1,
) -> AsyncIterator[LocalEdge]:
    """Run the local edge as `workers` child processes sharing two ports (each its own interpreter)."""
    procs: list[asyncio.subprocess.Process] = []
    ports = (0, 0)
    try:
        for _ in range(workers):
            with log.open("ab") as err:
                proc = await asyncio.create_subprocess_exec(
                    *prefix, sys.executable, "-m", "bench.local_edge",
                    "--upstream-port", str(upstream_port), "--cert", str(cert), "--key", str(key),
                    "--keepalive", str(keepalive), "--http-port", str(ports[0]), "--tls-port", str(ports[1]),
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err,
                )  # fmt: skip
            procs.append(proc)
            assert proc.stdout is not None
            try:
                info = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
            except (TimeoutError, ValueError):
                raise RuntimeError(f"the local edge did not start: {log.read_text()[-2000:]}") from None
            ports = (info["http_port"], info["tls_port"])
        yield LocalEdge(info["http_port"], info["tls_port"], info["host"], info["token"], tuple(p.pid for p in procs))
    finally:
        for proc in procs:
            await stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--keepalive", type=int, required=True, help="idle upstream connections kept")
    parser.add_argument("--http-port", type=int, default=0, help="0: any free port")
    parser.add_argument("--tls-port", type=int, default=0, help="0: any free port")
    args = parser.parse_args()
    uvloop.run(_serve(args.upstream_port, args.cert, args.key, args.keepalive, (args.http_port, args.tls_port)))


if __name__ == "__main__":
    main()
