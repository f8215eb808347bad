"""`mvm edge`: edge workers of a fleet, one process per core, sharing the port (SO_REUSEPORT).

A worker holds no VM state: it routes by the catalog (`fleet.routes`), verifies tokens
with its own keys, asks the VM's host to wake it, and proxies with the same data plane
as `mvm serve` (`edge.http1`). Any worker can answer any request, so they can be added,
restarted or killed without losing anything.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop
from aiohttp import web

from edge.app import bind_listener, end_upstreams, proxy_context, raise_nofile_limit, until_signalled
from edge.config import Config, token_service
from edge.http1 import make_protocol_factory
from edge.metrics import Metrics
from edge.proxy_context import ProxyContext
from edge.tls import server_context
from vmm import jsonlog
from vmm.catalog import Catalog, open_catalog
from vmm.catalog.sqlite import SqliteCatalog
from vmm.jsonlog import log
from vmm.model import VmState

from .edge_control import build_edge_control_app
from .host_client import HostClient
from .remote_backend import RemoteBackend
from .routes import RouteTable
from .run_dir import RunDir, join_table, worker_nofile

SUPERVISE_EVERY = 0.2  # seconds between looks at the worker processes
METRICS_FLUSH_EVERY = 1.0  # seconds: how late a worker's per-request counts may reach the set's /metrics


@dataclass
class EdgeNode:
    """A running edge worker: what `stop` takes down, and what tests look at."""

    cfg: Config
    catalog: Catalog
    routes: RouteTable
    backend: RemoteBackend
    hosts: HostClient
    ctx: ProxyContext
    server: asyncio.Server
    control: web.AppRunner
    control_dir: tempfile.TemporaryDirectory[str]

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])


async def start(cfg: Config) -> EdgeNode:
    jsonlog.configure(cfg.log.level)
    raise_nofile_limit(cfg.server.rlimit_nofile)
    ssl_ctx: ssl.SSLContext | None = server_context(cfg.server.tls_cert, cfg.server.tls_key) if cfg.server.tls else None
    tokens = token_service(cfg)
    listener = bind_listener(cfg.server.listen_host, cfg.server.listen_port, reuse_port=True)
    try:
        catalog = await open_catalog(cfg.catalog.url, cfg.vmm.state_dir / "catalog.sqlite3")
    except BaseException:
        listener.close()
        raise
    read_now = catalog.get_vm_now if isinstance(catalog, SqliteCatalog) else None
    routes = RouteTable(catalog, cfg.cluster.down_after, cfg.cluster.heartbeat_interval, read_now)
    await routes.start()
    hosts = HostClient(cfg.cluster.secret)
    backend = RemoteBackend(routes, hosts, cfg.cluster.secret, direct=cfg.cluster.direct)
    metrics = Metrics(lambda: _counts(routes))
    control_dir = tempfile.TemporaryDirectory(prefix="mvm-edge-control-")
    control_socket = str(Path(control_dir.name) / "control.sock")
    control = web.AppRunner(build_edge_control_app(cfg, routes, hosts, tokens, metrics), access_log=None)
    await control.setup()
    await web.UnixSite(control, control_socket).start()
    ctx = proxy_context(cfg, backend, tokens, metrics, control_socket)
    ctx.shared_ips = join_table(os.getpid())  # in a set: the per-IP limit counts every worker's connections
    if metrics.shared is not None:
        metrics.flush_every(METRICS_FLUSH_EVERY)
    routes.listeners.append(lambda rec: end_upstreams(ctx.pool, rec))
    server = await asyncio.get_running_loop().create_server(
        make_protocol_factory(ctx), sock=listener, ssl=ssl_ctx, backlog=1024
    )
    backend.start(ctx.open_streams)
    node = EdgeNode(cfg, catalog, routes, backend, hosts, ctx, server, control, control_dir)
    log.event("edge.worker_started", listen=f"{cfg.server.listen_host}:{node.port}", pid=os.getpid(),
              catalog=catalog.backend)  # fmt: skip
    return node


async def stop(node: EdgeNode) -> None:
    """Drain the requests in flight, then hand the last activity batch to the hosts."""
    node.server.close()
    cut = await node.ctx.drain(node.cfg.server.drain_timeout)
    node.ctx.pool.close()
    node.ctx.trimmer.close()
    if node.ctx.shared_ips is not None:
        node.ctx.shared_ips.release()
        node.ctx.shared_ips.close()
    await node.backend.stop()
    await node.control.cleanup()
    await node.routes.stop()
    await node.hosts.close()
    await node.catalog.close()
    node.control_dir.cleanup()
    node.ctx.metrics.stop_flushing()
    log.event("edge.worker_stopped", pid=os.getpid(), cut=cut)


def _counts(routes: RouteTable) -> dict[str, int]:
    counts = Counter(rec.state.value for _, rec in routes.records())
    return {state.value: counts.get(state.value, 0) for state in VmState if state is not VmState.TERMINATED}


def serve_worker(cfg: Config) -> None:
    """One worker in this process, until SIGINT or SIGTERM."""
    uvloop.run(_worker_until_signalled(cfg))


async def _worker_until_signalled(cfg: Config) -> None:
    node = await start(cfg)
    await until_signalled()
    await stop(node)


def worker_count(cfg: Config) -> int:
    return cfg.server.workers or os.cpu_count() or 1


def run_set(cfg: Config, commands: list[list[str]], workers: int,
            first_ready: Callable[[], bool] | None = None, wait: float = 0.0) -> int:  # fmt: skip
    """`run_processes` with the set's run directory (`fleet.run_dir`): made before the first
    child starts, handed to every child, removed once they have all ended."""
    run = RunDir.create(workers, worker_nofile(cfg.server.rlimit_nofile))
    try:
        return run_processes(commands, first_ready, wait, env=run.env(), on_exit=run.forget)
    finally:
        run.remove()


def run_processes(
    commands: list[list[str]], first_ready: Callable[[], bool] | None = None, wait: float = 0.0,
    env: dict[str, str] | None = None, on_exit: Callable[[int], None] = lambda pid: None,
) -> int:  # fmt: skip
    """Start every command as a child, forward SIGINT/SIGTERM to all, and end when they have.

    With `first_ready`, the others start only once it says the first child is ready (`mvm
    serve`: edges open the port when the host can take requests), for at most `wait` seconds.
    If one child ends on its own, the others are stopped too (a supervisor such as systemd
    then restarts the whole set): a fleet role never runs half-started. `on_exit(pid)` runs
    once for each child that has ended.
    """
    children: list[subprocess.Popen[bytes]] = []
    reaped: set[int] = set()
    stopping = False

    def stop_all(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    children.append(subprocess.Popen(commands[0], env=env))
    deadline = time.monotonic() + wait
    while first_ready is not None and not stopping and not first_ready():
        if children[0].poll() is not None or time.monotonic() > deadline:
            log.event("fleet.first_not_ready", level="error", command=" ".join(commands[0]), waited=wait)
            stop_all(signal.SIGTERM, None)
            break
        time.sleep(SUPERVISE_EVERY)
    if not stopping:
        children += [subprocess.Popen(command, env=env) for command in commands[1:]]
    status = 0
    while any(child.poll() is None for child in children):
        time.sleep(SUPERVISE_EVERY)
        ended = [child for child in children if child.returncode is not None]
        for child in ended:
            if child.pid not in reaped:
                reaped.add(child.pid)
                on_exit(child.pid)
        if ended and not stopping:
            log.event("fleet.child_exited", level="error", pid=ended[0].pid, status=ended[0].returncode)
            status = ended[0].returncode or 1
            stop_all(signal.SIGTERM, None)
    return status if len(children) == len(commands) else (children[0].returncode or 1)


def host_answers(address: str) -> Callable[[], bool]:
    """Whether the host API at `address` (host:port) answers /healthz: it has recovered its VMs."""

    def check() -> bool:
        try:
            with urllib.request.urlopen(f"http://{address}/healthz", timeout=1) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    return check


def worker_command(config: Path | None, role: str) -> list[str]:
    command = [sys.executable, "-m", "edge.cli", role]
    return command + (["--config", str(config)] if config is not None else [])
