"""`mvm host`: one VM host of a fleet.

It owns the QEMU processes, namespaces, images, templates and snapshots of its machine
(the same VM manager and idle reaper as `mvm serve`), publishes them to the shared
catalog, and serves:
  - the host API: the control API of its own VMs (create, suspend, resume, delete, logs,
    exec, files, ...) plus `wake`, activity batches from edges and health with capacity,
    all behind the cluster secret;
  - the data port, through which edges on other machines reach its guests.
With `cluster.tls` both speak mutual TLS: only edges with a certificate from a trusted CA get in.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import time
from dataclasses import dataclass, replace
from typing import Any

import uvloop
from aiohttp import web
from aiohttp.typedefs import Middleware

from edge.app import ensure_default_template, until_signalled
from edge.control import MANAGER, Handler, build_control_app, error_response, json_response
from edge.metrics import Metrics
from edge.settings import token_service
from fleet.catalog import Catalog, open_catalog
from vmm import faults, jsonlog
from vmm.errors import InvalidRequest
from vmm.jsonlog import log
from vmm.manager import VmManager
from vmm.network.egress_proxy import EgressProxies
from vmm.open_work import MAX_LEASE
from vmm.reaper import Reaper

from .cluster_tls import ClusterTls, cluster_tls
from .data_port import DataPort
from .host_sync import HostAddress, HostSync, capacity
from .move_api import HOST_MANAGER, add_host_routes
from .privilege import worker_identity
from .run_dir import broker_path
from .settings import FleetConfig
from .supervisor import announce_ready
from .upstream_broker import NotHere, UpstreamBroker

SYNC = web.AppKey("sync", HostSync)


@dataclass
class Host:
    """A running host: what `stop` takes down, and what tests look at."""

    cfg: FleetConfig
    host_id: str
    manager: VmManager
    catalog: Catalog
    sync: HostSync
    api: web.AppRunner
    data: DataPort
    reaper: Reaper
    egress: EgressProxies
    tls: ClusterTls | None
    broker: UpstreamBroker | None  # in `mvm serve` only

    @property
    def api_port(self) -> int:
        server = self.api.addresses[0]
        return int(server[1])


def host_id_of(cfg: FleetConfig) -> str:
    return cfg.cluster.host_id or socket.gethostname().split(".")[0].lower()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def start(cfg: FleetConfig, lock_fd: int | None = None) -> Host:
    """Recover this host's VMs, publish them, then serve the host API and the data port.

    `lock_fd`: the state directory's lock, taken by `mvm serve` before it started this process.
    A step that fails stops the ones before it (the manager too: its lock is released).
    """
    jsonlog.configure(cfg.log.level)
    host_id = host_id_of(cfg)
    metrics = Metrics(
        lambda: manager.counts_by_state(), (lambda: manager.usage_all()) if cfg.server.per_vm_metrics else None
    )
    egress = EgressProxies(metrics.egress)  # each VM's egress proxy: a per-VM network service the manager opens
    manager = VmManager(cfg.vmm, egress=egress, lock_fd=lock_fd)
    tls = cluster_tls(cfg.cluster, "host")  # its files are checked before anything starts
    async with contextlib.AsyncExitStack() as started:
        started.push_async_callback(egress.close_all)
        catalog = await open_catalog(cfg.catalog.url, cfg.vmm.state_dir / "catalog.sqlite3")
        started.push_async_callback(catalog.close)
        faults.point("host.catalog")
        await manager.start()
        started.push_async_callback(manager.close)
        faults.point("host.manager")
        await ensure_default_template(manager)
        sync = HostSync(catalog, manager, host_id, cfg.cluster.heartbeat_interval)
        api_server = replace(cfg.server, admin_key=cfg.cluster.secret)  # edges call it with the cluster's key
        app = build_control_app(
            api_server, manager, token_service(cfg.tokens), metrics, manager.records.events, cfg.vmm.events.keepalive
        )
        app.router.add_post("/v1/vms/{vm_id}/wake", wake)
        app.router.add_post("/v1/host/activity", activity)
        app.router.add_get("/v1/host", health)
        app.router.add_get("/v1/host/usage", vm_usage)
        app[HOST_MANAGER], app[SYNC] = manager, sync  # before the app is frozen and serving
        add_host_routes(app)
        app.middlewares.append(catalog_first)
        if tls is not None:
            app.middlewares.insert(0, peer_still_trusted(tls))
        # On SIGTERM requests in flight get server.drain_timeout to finish before they are cancelled.
        api = web.AppRunner(app, access_log=None, shutdown_timeout=cfg.server.drain_timeout)
        await api.setup()
        started.push_async_callback(api.cleanup)
        listen_host, listen_port = _split(cfg.cluster.host_listen)
        await web.TCPSite(api, listen_host, listen_port, ssl_context=tls.context if tls else None).start()
        faults.point("host.api")
        api_port = int(api.addresses[0][1])
        advertised = cfg.cluster.advertise or f"{listen_host}:{api_port}"
        data = DataPort(cfg.cluster.secret, lambda vm_id, port: _reachable(manager, vm_id, port), tls=tls)
        manager.listeners.append(data.vm_changed)
        data_host, data_port = _split(cfg.cluster.data_listen)
        await data.start(data_host, data_port)
        started.push_async_callback(data.stop)
        faults.point("host.data_port")
        broker = await _start_broker(cfg, manager)
        if broker is not None:
            started.push_async_callback(broker.stop)
        advertised_host = advertised.rpartition(":")[0]
        scheme = "https" if tls is not None else "http"
        await sync.start(HostAddress(f"{scheme}://{advertised}", f"{advertised_host}:{data.port}"))
        started.push_async_callback(sync.stop)
        if tls is not None:
            tls.watch()
            started.push_async_callback(tls.stop)
        reaper = Reaper(manager, cfg.reaper.interval)
        reaper.start()
        started.push_async_callback(reaper.stop)
        faults.point("host.serving")
        started.pop_all()  # all started: `stop` takes them down from now on
    log.event("host.started", host=host_id, api=advertised, data_port=data.port, catalog=catalog.backend,
              tls=tls is not None)  # fmt: skip
    return Host(cfg, host_id, manager, catalog, sync, api, data, reaper, egress, tls, broker)


async def stop(host: Host) -> None:
    """Drain, then stop the reaper and the manager (VMs keep running or suspend per config).

    Draining: no VM is woken any more (503), no new tunnel or host API connection is taken,
    and the tunnels and host API requests in flight get server.drain_timeout to finish, so
    on_shutdown = "suspend" never suspends a VM under a request that is still being answered.
    """
    host.manager.refuse_wakes()
    loop = asyncio.get_running_loop()
    began = loop.time()
    if host.broker is not None:
        await host.broker.stop()
    cut, _ = await asyncio.gather(host.data.stop(host.cfg.server.drain_timeout), host.api.cleanup())
    log.event("host.drained", host=host.host_id, seconds=round(loop.time() - began, 3), tunnels_cut=cut)
    await host.reaper.stop()
    if host.tls is not None:
        await host.tls.stop()
    await host.manager.close()
    await host.sync.stop()
    await host.egress.close_all()
    await host.catalog.close()
    log.event("host.stopped", host=host.host_id)


async def _start_broker(cfg: FleetConfig, manager: VmManager) -> UpstreamBroker | None:
    """In `mvm serve`: the broker through which this set's workers, no longer root, reach guests."""
    path = broker_path()
    if path is None:
        return None
    identity = worker_identity(cfg.server.worker_user)

    async def connect(vm_id: str, port: int, timeout: float) -> socket.socket:
        if manager.lookup(vm_id) is None:
            raise NotHere(vm_id)
        if not _reachable(manager, vm_id, port):
            raise PermissionError(errno.EACCES, f"port {port} is not on VM {vm_id}'s allow-list")
        return await manager.open_upstream(vm_id, port, timeout)

    broker = UpstreamBroker(path, connect, identity.uid if identity is not None else os.getuid())
    await broker.start()
    return broker


def _reachable(manager: VmManager, vm_id: str, port: int) -> bool:
    rec = manager.lookup(vm_id)
    return rec is not None and rec.allows_port(port)


def peer_still_trusted(tls: ClusterTls) -> Middleware:
    """Refuse requests on a keep-alive connection whose edge certificate a reload stopped trusting."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        if not tls.trusts(transport.get_extra_info("ssl_object") if transport is not None else None):
            log.event("host.peer_untrusted", level="warning", peer=str(request.remote), path=request.path)
            response = error_response(403, "the edge's certificate is no longer trusted by this host")
            response.force_close()
            return response
        return await handler(request)

    return check


@web.middleware
async def catalog_first(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Whatever a request changed is in the catalog before its answer leaves: an edge that
    created or woke a VM routes by the new record at once."""
    response = await handler(request)
    if request.method != "GET":
        sync = request.app[SYNC]
        await sync.flush()
        if request.path.startswith("/v1/templates") and response.status < 300:
            await sync.sync_templates(removed=request.match_info.get("name") if request.method == "DELETE" else None)
    return response


async def wake(request: web.Request) -> web.Response:
    """An edge holds a request for this VM: resume or restore it (shared by concurrent callers).

    The answer carries the record's state_changed_at, so an edge can tell it from older news.
    """
    manager = request.app[MANAGER]
    vm_id = request.match_info["vm_id"]
    await manager.ensure_running(vm_id)
    manager.touch(vm_id)  # a request is waiting: the idle clock restarts now, not at its first byte
    return json_response(manager.get(vm_id).to_dict())


async def activity(request: web.Request) -> web.Response:
    """An edge's batch: last-activity times {"vms": {id: unix time}}, and its open streams per VM
    {"open": {id: n}, "edge": <its id>, "lease": seconds}, which replace what that edge reported
    before and count as open work on this host (the reaper's figure) until the lease runs out."""
    body: Any = await request.json()
    if not isinstance(body, dict):
        raise InvalidRequest('the body must be {"vms": {...}, "open": {...}, "edge": "<id>", "lease": <seconds>}')
    vms, open_streams, edge, lease = body.get("vms"), body.get("open", {}), body.get("edge"), body.get("lease")
    if not isinstance(vms, dict) or not all(isinstance(t, int | float) for t in vms.values()):
        raise InvalidRequest('vms must be {"<vm id>": <unix time>, ...}')
    if not isinstance(open_streams, dict) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in open_streams.values()
    ):
        raise InvalidRequest('open must be {"<vm id>": <open streams, a whole number >= 0>, ...}')
    if open_streams and (not isinstance(edge, str) or not edge):
        raise InvalidRequest("edge must name the edge that reports open streams")
    if open_streams and (isinstance(lease, bool) or not isinstance(lease, int | float) or not 0 < lease <= MAX_LEASE):
        raise InvalidRequest(f"lease must be a number of seconds in (0, {MAX_LEASE:g}]")
    manager = request.app[HOST_MANAGER]
    now = time.time()
    for vm_id, at in vms.items():
        manager.touch(str(vm_id), min(float(at), now))
    if isinstance(edge, str) and edge:
        manager.open_work.report(edge, open_streams, float(lease or 0))
    return web.Response(status=204)


async def vm_usage(request: web.Request) -> web.Response:
    """GET /v1/host/usage: every VM's usage on this host (an edge's per-VM Prometheus series)."""
    return json_response({"vms": [usage.to_dict() for usage in request.app[HOST_MANAGER].usage_all()]})


async def health(request: web.Request) -> web.Response:
    sync = request.app[SYNC]
    cap = capacity(sync.manager)
    return json_response(
        {"id": sync.host_id, "vms": len(sync.manager.list_vms()),
         "capacity": {"memory_mb": cap.memory_mb, "vcpus": cap.vcpus, "disk_mb": cap.disk_mb}}
    )  # fmt: skip


def serve(cfg: FleetConfig, lock_fd: int | None = None, ready_fd: int | None = None) -> None:
    """Run until SIGINT or SIGTERM (`mvm host`); `lock_fd` and `ready_fd` come from `mvm serve`'s supervisor."""
    uvloop.run(_serve_until_signalled(cfg, lock_fd, ready_fd))


async def _serve_until_signalled(cfg: FleetConfig, lock_fd: int | None, ready_fd: int | None) -> None:
    host = await start(cfg, lock_fd)
    print(f"microvm-edge host {host.host_id}: host API on {cfg.cluster.host_listen}", flush=True)
    announce_ready(ready_fd)
    await until_signalled()
    await stop(host)
