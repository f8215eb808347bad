"""`mvm edge`: edge workers of a fleet, one process per core, sharing the port (SO_REUSEPORT).

A worker holds no VM state: it routes by the catalog (`fleet.routes`), verifies tokens
with its own keys, asks the VM's host to wake it, and proxies with the same data plane
as `mvm serve` (`edge.http1`). Any worker can answer any request, so they can be added,
restarted or killed without losing anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import uvloop
from aiohttp import web

from edge import mcp_http
from edge.app import bind_listener, end_upstreams, proxy_context, raise_nofile_limit, until_signalled
from edge.h2_conn import make_listener_factory
from edge.metrics import Metrics
from edge.proxy_context import ProxyContext
from edge.settings import token_service
from edge.tls import server_context
from fleet.catalog import Catalog, open_catalog
from fleet.catalog.sqlite import SqliteCatalog
from vmm import faults, jsonlog
from vmm.jsonlog import log
from vmm.model import VmState

from . import control_dir as control_dirs
from .cluster_tls import ClusterTls, cluster_tls
from .data_port import recheck_relays
from .edge_control import HostsUsage, build_edge_control_app
from .event_feed import CatalogEvents
from .host_client import HostClient
from .privilege import Identity, drop_to, worker_identity
from .remote_backend import RemoteBackend
from .routes import FleetState, RouteTable
from .run_dir import broker_path, join_table
from .settings import FleetConfig
from .supervisor import announce_ready
from .tls_mirror import mirrored

METRICS_FLUSH_EVERY = 1.0  # seconds: how late a worker's per-request counts may reach the set's /metrics


@dataclass
class EdgeNode:
    """A running edge worker: what `stop` takes down, and what tests look at."""

    cfg: FleetConfig
    catalog: Catalog
    routes: RouteTable
    backend: RemoteBackend
    hosts: HostClient
    ctx: ProxyContext
    server: asyncio.Server
    control: web.AppRunner
    control_dir: tempfile.TemporaryDirectory[str]
    tls: ClusterTls | None = None
    events: CatalogEvents | None = None

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])


async def start(cfg: FleetConfig, become: Identity | None = None) -> EdgeNode:
    """Open the catalog, the control API and the listener; a step that fails stops the ones before it.

    `become`: the worker process gives up root for this identity once its port, keys and catalog
    are open (a worker's own process only: never a process that runs other things, e.g. a test's).
    """
    jsonlog.configure(cfg.log.level)
    raise_nofile_limit(cfg.server.rlimit_nofile)
    ssl_ctx: ssl.SSLContext | None = None
    if cfg.server.tls:
        ssl_ctx = server_context(cfg.server.tls_cert, cfg.server.tls_key, cfg.proxy.http2.enabled)
    tokens = token_service(cfg.tokens)
    tls = cluster_tls(mirrored(cfg.cluster), "edge")  # its files are checked before anything starts
    async with contextlib.AsyncExitStack() as started:
        listener = bind_listener(cfg.server.listen_host, cfg.server.listen_port, reuse_port=True)
        started.callback(listener.close)
        faults.point("edge.listening")
        catalog = await open_catalog(cfg.catalog.url, cfg.vmm.state_dir / "catalog.sqlite3")
        started.push_async_callback(catalog.close)
        read_now = catalog.get_vm_now if isinstance(catalog, SqliteCatalog) else None
        if isinstance(catalog, SqliteCatalog):
            catalog.open_reader()
        if become is not None:
            drop_to(become)
        broker = broker_path()
        broker = broker if broker is not None and broker.exists() else None
        direct = cfg.cluster.direct and (broker is not None or os.geteuid() == 0)  # a namespace takes root
        routes = RouteTable(catalog, cfg.cluster.down_after, cfg.cluster.heartbeat_interval, read_now)
        await routes.start()
        started.push_async_callback(routes.stop)
        faults.point("edge.routes")
        if tls is not None:
            tls.watch()
            started.push_async_callback(tls.stop)
        context = tls.context if tls is not None else None
        hosts = HostClient(cfg.cluster.secret, context)
        started.push_async_callback(hosts.close)
        if tls is not None:  # a reload: hosts no longer trusted get no new request, and their tunnels end
            tls.listeners += [hosts.renew, lambda: recheck_relays(tls.trusts)]
        backend = RemoteBackend(routes, hosts, cfg.cluster.secret, direct=direct, tls=context, broker=broker)
        hosts_usage = HostsUsage() if cfg.server.per_vm_metrics else None
        metrics = Metrics(lambda: _counts(routes), hosts_usage)
        control_dir = control_dirs.make()
        started.callback(control_dir.cleanup)
        control_socket = str(Path(control_dir.name) / "control.sock")
        events = CatalogEvents(catalog, cfg.vmm.events)  # the fleet's event feed, as every edge serves it
        await events.start()
        started.push_async_callback(events.stop)
        control_app = build_edge_control_app(cfg, routes, hosts, tokens, metrics, hosts_usage, events.ring)
        mcp_http.mount(control_app, control_socket, cfg.server.admin_key)
        control = web.AppRunner(control_app, access_log=None)
        await control.setup()
        started.push_async_callback(control.cleanup)
        await web.UnixSite(control, control_socket).start()
        faults.point("edge.control")
        ctx = proxy_context(cfg, backend, tokens, metrics, control_socket)
        ctx.shared_ips = join_table(os.getpid())  # in a set: the per-IP limit counts every worker's connections
        if metrics.shared is not None:
            metrics.flush_every(METRICS_FLUSH_EVERY)
        started.callback(ctx.pool.close)
        started.callback(ctx.trimmer.close)
        routes.listeners.append(lambda rec: end_upstreams(ctx.pool, rec))
        server = await asyncio.get_running_loop().create_server(
            make_listener_factory(ctx, cfg.server.tls), sock=listener, ssl=ssl_ctx, backlog=1024
        )
        started.callback(server.close)
        backend.start(ctx.open_streams)
        started.push_async_callback(backend.stop)
        faults.point("edge.serving")
        node = EdgeNode(cfg, catalog, routes, backend, hosts, ctx, server, control, control_dir, tls, events)
        started.pop_all()  # all started: `stop` takes them down from now on
    log.event("edge.worker_started", listen=f"{cfg.server.listen_host}:{node.port}", pid=os.getpid(),
              catalog=catalog.backend, uid=os.getuid(),
              upstreams="broker" if broker else "namespace" if direct else "tunnel")  # fmt: skip
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
    if node.tls is not None:
        await node.tls.stop()
    await node.control.cleanup()
    if node.events is not None:
        await node.events.stop()
    await node.routes.stop()
    await node.hosts.close()
    await node.catalog.close()
    node.control_dir.cleanup()
    node.ctx.metrics.stop_flushing()
    log.event("edge.worker_stopped", pid=os.getpid(), cut=cut)


def _counts(routes: RouteTable) -> dict[str, int]:
    counts = Counter(rec.state.value for _, rec in routes.records())
    shown = [*(s for s in VmState if s is not VmState.TERMINATED), *FleetState]
    return {state.value: counts.get(state.value, 0) for state in shown}


def serve_worker(cfg: FleetConfig, ready_fd: int | None = None) -> None:
    """One worker in this process, until SIGINT or SIGTERM; `ready_fd`: the supervisor's pipe."""
    uvloop.run(_worker_until_signalled(cfg, ready_fd))


async def _worker_until_signalled(cfg: FleetConfig, ready_fd: int | None) -> None:
    node = await start(cfg, worker_identity(cfg.server.worker_user))
    announce_ready(ready_fd)
    await until_signalled()
    await stop(node)


def worker_count(cfg: FleetConfig) -> int:
    return cfg.server.workers or os.cpu_count() or 1


def worker_command(config: Path | None, role: str) -> list[str]:
    command = [sys.executable, "-m", "mvm.cli", role]
    return command + (["--config", str(config)] if config is not None else [])
