"""The control API of a fleet edge: the same paths as `mvm serve`'s, answered from the catalog or by the VM's host.

Listing and reading VMs, tokens and hosts are answered here (catalog and local keys);
creating a VM places it on a host; everything else about one VM (suspend, resume,
delete, logs, exec, files) is forwarded to the host that has it, streamed both ways.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

from edge import console, events_api
from edge.checkpoint_api import parse_from_checkpoint
from edge.control import (
    METRICS,
    SERVER,
    TOKENS,
    errors_and_auth,
    healthz,
    json_response,
    metrics,
    openapi,
    read_body,
    token_answer,
    vm_url,
)
from edge.metrics import Metrics
from edge.paging import page, page_request
from edge.tokens import TokenService
from fleet.catalog import HostRecord
from vmm.errors import NotFound, NotRunning, OverCapacity, VmmError
from vmm.events import EventRing
from vmm.jsonlog import log
from vmm.model import VmRecord
from vmm.template import check_name
from vmm.usage import VmUsage

from .host_client import FORWARD_TIMEOUT, HostClient
from .mover import Mover
from .placement import candidates
from .routes import RouteTable
from .run_dir import console_sessions_dir
from .settings import FleetConfig

ROUTES = web.AppKey("routes", RouteTable)
HOSTS = web.AppKey("hosts", HostClient)
DEFAULT_TEMPLATE = web.AppKey("default_template", str)  # vmm.default_template
_HOP_BY_HOP = frozenset(("connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host",
                         "content-length", "authorization"))  # fmt: skip


def placed_json(request: web.Request, host_id: str, rec: VmRecord) -> dict[str, Any]:
    data = rec.to_dict()
    data["url"] = vm_url(request.app[SERVER], rec.id)
    data["host"] = host_id
    return data


async def list_vms(request: web.Request) -> web.Response:
    """One page of the fleet's VMs, in the same order and with the same cursor as a host's (edge.paging)."""
    wanted = page_request(request.query, request.app[SERVER].list_page_size)
    placed = request.app[ROUTES].records()
    host_of = {rec.id: host for host, rec in placed}
    vms, after = page((rec for _, rec in placed), wanted)
    return json_response({"vms": [placed_json(request, host_of[rec.id], rec) for rec in vms], "next": after})


async def get_vm(request: web.Request) -> web.Response:
    routes, vm_id = request.app[ROUTES], request.match_info["vm_id"]
    placed = await routes.reload(vm_id)
    rec = routes.record(vm_id)
    if placed is None or rec is None:
        raise NotFound(f"VM {vm_id!r} does not exist")
    return json_response(placed_json(request, placed.host_id, rec))


async def issue_token(request: web.Request) -> web.Response:
    vm_id = request.match_info["vm_id"]
    if request.app[ROUTES].placed(vm_id) is None and await request.app[ROUTES].reload(vm_id) is None:
        raise NotFound(f"VM {vm_id!r} does not exist")
    return await token_answer(request, vm_id)


async def list_hosts(request: web.Request) -> web.Response:
    routes = request.app[ROUTES]
    vms_on = Counter(host for host, _ in routes.records())
    hosts = [
        {"id": h.id, "address": h.address, "up": routes.host_up(h.id), "heartbeat_at": h.heartbeat_at,
         "capacity": {"memory_mb": h.capacity.memory_mb, "vcpus": h.capacity.vcpus, "disk_mb": h.capacity.disk_mb},
         "vms": vms_on[h.id]}
        for h in sorted(routes.hosts(), key=lambda h: h.id)
    ]  # fmt: skip
    return json_response({"hosts": hosts})


async def create_vm(request: web.Request) -> web.Response:
    """Place the VM: hosts that have the template, most free memory first; a full host passes it on."""
    body = await read_body(request)
    wanted = body.pop("host", None)
    if wanted is not None and not isinstance(wanted, str):
        raise web.HTTPUnprocessableEntity(reason="host must be a host id (see GET /v1/hosts)")
    routes, hosts = request.app[ROUTES], request.app[HOSTS]
    if "from_checkpoint" in body:
        return await _create_from_checkpoint(request, body, wanted)
    template = check_name(body.get("template") or request.app[DEFAULT_TEMPLATE])
    having = await routes.catalog.template_hosts(template)
    if not having:
        raise NotFound(f"template {template!r} does not exist on any host (create it with `mvm template create`)")
    tried: list[str] = []
    for host in candidates(routes.hosts(), having, routes.host_up, wanted):
        try:
            rec = await hosts.call(host.id, host.address, "POST", "/v1/vms", body)
        except VmmError as exc:
            if exc.http_status not in (503, 507):
                raise
            tried.append(f"{host.id}: {exc}")
            log.event("edge.placement_skipped", host=host.id, error=str(exc))
            continue
        await routes.reload(rec["id"])
        rec["host"] = host.id
        log.event("edge.placed", vm=rec["id"], host=host.id, template=template)
        return json_response(rec, 201)
    if tried:
        raise OverCapacity(f"no host could take a VM of template {template!r}: " + "; ".join(tried))
    asked = f" (host {wanted!r} asked for)" if wanted else ""
    raise NotRunning(f"no host that is up has template {template!r}{asked}")


async def _create_from_checkpoint(request: web.Request, body: dict[str, Any], wanted: str | None) -> web.Response:
    """A VM from a checkpoint (a fork's child) starts on the host that has the checkpoint: its VM's."""
    routes = request.app[ROUTES]
    vm_id, _ = parse_from_checkpoint(body["from_checkpoint"])
    placed = routes.placed(vm_id) or await routes.reload(vm_id)
    if placed is None:
        raise NotFound(f"VM {vm_id!r} does not exist")
    if wanted is not None and wanted != placed.host_id:
        raise web.HTTPUnprocessableEntity(
            reason=f"a VM from a checkpoint of VM {vm_id} starts on its host {placed.host_id}, not {wanted}"
        )
    host = routes.reachable_host(placed)
    rec = await request.app[HOSTS].call(host.id, host.address, "POST", "/v1/vms", body)
    await routes.reload(rec["id"])
    rec["host"] = host.id
    log.event("edge.placed", vm=rec["id"], host=host.id, parent=vm_id)
    return json_response(rec, 201)


async def move_vm(request: web.Request) -> web.Response:
    """POST /v1/vms/{id}/move {"to": host}: the VM with its memory, disk and device state, to another host."""
    body = await read_body(request)
    to = body.get("to")
    if not isinstance(to, str) or set(body) != {"to"}:
        raise web.HTTPUnprocessableEntity(reason='the body must be {"to": "<host id>"}')
    moved = await Mover(request.app[ROUTES], request.app[HOSTS]).move(request.match_info["vm_id"], to)
    return json_response(moved)


async def drain_host(request: web.Request) -> web.Response:
    """POST /v1/hosts/{host}/drain: every VM of the host to other hosts (running ones suspended first)."""
    report = await Mover(request.app[ROUTES], request.app[HOSTS]).drain(request.match_info["host_id"])
    return json_response(report, 200 if not report["failed"] else 207)


async def forward(request: web.Request) -> web.StreamResponse:
    """Everything else about one VM goes to its host, body and answer streamed."""
    routes = request.app[ROUTES]
    vm_id = request.match_info["vm_id"]
    placed = routes.placed(vm_id) or await routes.reload(vm_id)
    if placed is None:
        raise NotFound(f"VM {vm_id!r} does not exist")
    return await _forward_to(request, routes.reachable_host(placed))


class HostsUsage:
    """Every up host's per-VM usage, fetched for a scrape of /metrics ([server] per_vm_metrics): the
    hosts hold the VMs, and the scrape's collector (edge.metrics) reads `rows` synchronously."""

    def __init__(self) -> None:
        self.rows: list[VmUsage] = []

    def __call__(self) -> list[VmUsage]:
        return self.rows

    async def refresh(self, routes: RouteTable, hosts: HostClient) -> None:
        rows: list[VmUsage] = []
        for host in sorted(routes.hosts(), key=lambda h: h.id):
            if not routes.host_up(host.id):
                continue
            try:
                answer = await hosts.call(host.id, host.address, "GET", "/v1/host/usage")
            except VmmError as exc:  # one host's series are missing from this scrape, not the whole answer
                log.event("edge.usage_unavailable", level="warning", host=host.id, error=str(exc))
                continue
            rows += [VmUsage(**vm) for vm in answer["vms"]]
        self.rows = rows


HOSTS_USAGE = web.AppKey("hosts_usage", HostsUsage)


async def metrics_with_vms(request: web.Request) -> web.Response:
    """/metrics with the hosts' per-VM series."""
    await request.app[HOSTS_USAGE].refresh(request.app[ROUTES], request.app[HOSTS])
    return await metrics(request)


async def list_per_host(request: web.Request) -> web.Response:
    """GET /v1/templates or /v1/images: every up host's, each item with its host (they are per host)."""
    routes, hosts = request.app[ROUTES], request.app[HOSTS]
    kind = request.path.rsplit("/", 1)[-1]
    items = []
    for host in sorted(routes.hosts(), key=lambda h: h.id):
        if routes.host_up(host.id):
            for item in (await hosts.call(host.id, host.address, "GET", request.path))[kind]:
                items.append({**item, "host": host.id})
    return json_response({kind: items})


async def to_named_host(request: web.Request) -> web.StreamResponse:
    """Template and image changes go to one host: `?host=`, or the only host there is."""
    routes = request.app[ROUTES]
    up = [h for h in routes.hosts() if routes.host_up(h.id)]
    wanted = request.query.get("host")
    chosen = [h for h in up if h.id == wanted] if wanted else up
    if not up:
        raise NotRunning("no host is up to hold templates and images (see GET /v1/hosts)")
    if len(chosen) != 1:
        names = ", ".join(sorted(h.id for h in up))
        raise web.HTTPUnprocessableEntity(
            reason=f"templates and images are per host: name one with ?host= (hosts that are up: {names})"
        )
    return await _forward_to(request, chosen[0])


async def _forward_to(request: web.Request, host: HostRecord) -> web.StreamResponse:
    """The request, as it came, to `host`'s API; body and answer streamed."""
    hosts = request.app[HOSTS]
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await _forward_websocket(request, hosts, hosts.url(host.address, request.path_qs))
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
    url = hosts.url(host.address, request.path_qs)
    data = request.content if request.can_read_body else None
    try:
        async with hosts.session.request(
            request.method, url, headers=headers, data=data, timeout=FORWARD_TIMEOUT
        ) as upstream:
            kept = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
            if upstream.content_length is not None:  # a sized answer stays sized; a stream stays a stream
                kept["Content-Length"] = str(upstream.content_length)
            response = web.StreamResponse(status=upstream.status, headers=kept)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise NotRunning(f"host {host.id} did not answer: {exc}") from exc


async def _forward_websocket(request: web.Request, hosts: HostClient, url: str) -> web.WebSocketResponse:
    """The shell's WebSocket, message for message, between the client and the VM's host."""
    try:
        upstream = await hosts.session.ws_connect(url, autoping=True)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise NotRunning(f"the VM's host did not open the WebSocket: {exc}") from exc
    client = web.WebSocketResponse(autoping=True)
    await client.prepare(request)

    async def pump(src: Any, dst: Any) -> None:
        async for msg in src:
            if msg.type == aiohttp.WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif msg.type == aiohttp.WSMsgType.TEXT:
                await dst.send_str(msg.data)
            else:
                break
        await dst.close()

    try:
        await asyncio.gather(pump(client, upstream), pump(upstream, client))
    finally:
        await upstream.close()
        await client.close()
    return client


def build_edge_control_app(
    cfg: FleetConfig,
    routes: RouteTable,
    hosts: HostClient,
    tokens: TokenService,
    metrics_: Metrics,
    hosts_usage: HostsUsage | None = None,
    events: EventRing | None = None,
) -> web.Application:
    """`hosts_usage`: the per-VM series' source `metrics_` was made with ([server] per_vm_metrics), else None;
    `events`: the fleet's event feed GET /v1/events serves (fleet.event_feed.CatalogEvents)."""
    app = web.Application(middlewares=[errors_and_auth], client_max_size=24 * 1024**2)
    app[SERVER], app[DEFAULT_TEMPLATE] = cfg.server, cfg.vmm.default_template
    app[TOKENS], app[METRICS], app[ROUTES], app[HOSTS] = tokens, metrics_, routes, hosts
    app.router.add_get("/healthz", healthz)
    if hosts_usage is not None:
        app[HOSTS_USAGE] = hosts_usage
    app.router.add_get("/metrics", metrics if hosts_usage is None else metrics_with_vms)
    app.router.add_get("/openapi.json", openapi)
    if events is not None:
        events_api.add_routes(app, events, cfg.vmm.events.keepalive)
    console.add_routes(app, cfg.server, cfg.server.console_session_ttl, console_sessions_dir())
    app.router.add_get("/v1/hosts", list_hosts)
    app.router.add_get("/v1/templates", list_per_host)
    app.router.add_post("/v1/templates", to_named_host)
    app.router.add_delete("/v1/templates/{name}", to_named_host)
    app.router.add_get("/v1/images", list_per_host)
    app.router.add_delete("/v1/images/{name}", to_named_host)
    app.router.add_post("/v1/hosts/{host_id}/drain", drain_host)
    app.router.add_get("/v1/vms", list_vms)
    app.router.add_post("/v1/vms", create_vm)
    app.router.add_get("/v1/vms/{vm_id}", get_vm)
    app.router.add_post("/v1/vms/{vm_id}/tokens", issue_token)
    app.router.add_post("/v1/vms/{vm_id}/move", move_vm)
    app.router.add_delete("/v1/vms/{vm_id}", forward)
    app.router.add_route("*", "/v1/vms/{vm_id}/{tail:.*}", forward)
    return app
