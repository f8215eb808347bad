"""microvm-edge's process: where a request goes, and what runs beside it.

A request's path, top to bottom:
  1. The listener (`loop.create_server`, TLS from `edge.tls`) hands each client
     connection to an `edge.http1.EdgeProtocol`, the asyncio adapter of a sans-IO
     `edge.connection_core.ConnectionCore`, which parses request heads with llhttp.
     Each request becomes an `edge.exchange.Exchange`; its states name the steps below.
  2. `edge.hostnames.HostnameRouter` maps the Host header: the control host, `<vm-id>.<domain>`
     (the VM's app port) or `<port>-<vm-id>.<domain>` (a port on the VM's allow-list).
  3. Control host: the connection is spliced to the aiohttp control API (`edge.control`)
     on a unix socket; it authenticates with the admin key.
  4. VM host: the VM must exist (`VmManager.lookup`, in memory), the token (Bearer header,
     `?token=` or the `mvm_token` cookie) must verify for that VM (`edge.tokens`, cached).
  5. A paused or suspended VM is woken (one `VmManager.ensure_running` per VM at a time:
     `ProxyContext.wake`) while the request is held, within the wake timeout and the per-VM
     hold bound (`edge.reach`).
  6. The rewritten head and the body stream to the guest over an upstream connection made
     inside the VM's network namespace (`edge.upstream` pools them per VM for all clients); the
     answer streams back as bytes. Activity is recorded on the VM as bytes flow, and the
     request or tunnel counts as open work on it (the manager's `vmm.open_work.OpenWork`)
     until it ends, so the reaper never suspends a VM under it.
Beside the requests: the VM manager (`vmm.manager`), the idle reaper (`vmm.reaper`), each
VM's egress proxy (`vmm.network.egress_proxy`) and `/metrics` on the control host. On SIGTERM `stop`
drains: no new connections, no new wakes, requests in flight finish within
server.drain_timeout, then the manager's shutdown runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import uvloop
from aiohttp import web

from vmm import faults, jsonlog
from vmm.errors import ConfigError, NotFound
from vmm.jsonlog import log
from vmm.manager import VmManager
from vmm.model import GUEST_GOING_AWAY, VmRecord, VmState
from vmm.network.egress_proxy import EgressProxies
from vmm.open_work import OpenWork
from vmm.reaper import Reaper

from . import mcp_http, memory
from .backend import VmBackend
from .control import build_control_app
from .h2_conn import make_listener_factory
from .hostnames import HostnameRouter
from .metrics import Metrics
from .proxy_context import ProxyContext
from .settings import EdgeConfig, token_service
from .tls import server_context
from .tokens import TokenService
from .upstream import UpstreamPool
from .webhooks import Webhooks


@dataclass
class Edge:
    """A running edge: what `stop` has to take down, and what tests look at."""

    cfg: EdgeConfig
    manager: VmManager
    ctx: ProxyContext
    server: asyncio.Server
    control: web.AppRunner
    reaper: Reaper
    control_dir: tempfile.TemporaryDirectory[str]
    egress: EgressProxies
    webhooks: Webhooks | None = None

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])


async def start(cfg: EdgeConfig, lock_fd: int | None = None) -> Edge:
    """Start the VM manager, the control API, the listener and the reaper.

    `lock_fd`: the state directory's lock, when `mvm serve` took it before anything started.
    """
    jsonlog.configure(cfg.log.level)
    raise_nofile_limit(cfg.server.rlimit_nofile)
    log.event("edge.malloc", arenas_capped=memory.limit_arenas())
    # Everything that can fail on bad input is checked before the manager touches any VM.
    ssl_ctx: ssl.SSLContext | None = None
    if cfg.server.tls:
        ssl_ctx = server_context(cfg.server.tls_cert, cfg.server.tls_key, cfg.proxy.http2.enabled)
    tokens = token_service(cfg.tokens)
    async with contextlib.AsyncExitStack() as started:  # a step that fails stops the ones before it
        listener = bind_listener(cfg.server.listen_host, cfg.server.listen_port)
        started.callback(listener.close)
        faults.point("serve.listening")
        metrics = Metrics(
            lambda: manager.counts_by_state(), (lambda: manager.usage_all()) if cfg.server.per_vm_metrics else None
        )
        egress = EgressProxies(metrics.egress)  # each VM's egress proxy: a per-VM network service the manager opens
        manager = VmManager(cfg.vmm, egress=egress, lock_fd=lock_fd)
        started.push_async_callback(egress.close_all)
        await manager.start()
        started.push_async_callback(manager.close)
        faults.point("serve.manager")
        await ensure_default_template(manager)
        control_dir = tempfile.TemporaryDirectory(prefix="mvm-control-")
        started.callback(control_dir.cleanup)
        control_socket = str(Path(control_dir.name) / "control.sock")
        events = manager.records.events
        webhooks = Webhooks(cfg.vmm.events, metrics)  # off the wake path: recording an event only queues it
        events.listeners.append(webhooks.offer)
        webhooks.start()
        started.push_async_callback(webhooks.stop)
        control_app = build_control_app(cfg.server, manager, tokens, metrics, events, cfg.vmm.events.keepalive)
        mcp_http.mount(control_app, control_socket, cfg.server.admin_key)
        control = web.AppRunner(control_app, access_log=None)
        await control.setup()
        started.push_async_callback(control.cleanup)
        await web.UnixSite(control, control_socket).start()
        faults.point("serve.control")
        ctx = proxy_context(cfg, manager, tokens, metrics, control_socket, manager.open_work)
        manager.listeners.append(lambda rec: end_upstreams(ctx.pool, rec))
        loop = asyncio.get_running_loop()
        factory = make_listener_factory(ctx, cfg.server.tls)
        server = await loop.create_server(factory, sock=listener, ssl=ssl_ctx, backlog=1024)
        started.callback(server.close)
        faults.point("serve.serving")
        started.pop_all()  # all started: `stop` takes them down from now on
    idle_reaper = Reaper(manager, cfg.reaper.interval)
    idle_reaper.start()
    edge = Edge(cfg, manager, ctx, server, control, idle_reaper, control_dir, egress, webhooks)
    log.event(
        "edge.started",
        listen=f"{cfg.server.listen_host}:{edge.port}",
        tls=cfg.server.tls,
        domain=cfg.server.domain,
        control_host=cfg.server.control_host,
        accelerator=manager.accel.name,
    )
    return edge


async def stop(edge: Edge) -> None:
    """Drain, then stop the reaper, control API and manager (VMs keep or suspend per config).

    Draining: the listener closes, idle clients are closed, requests in flight get
    server.drain_timeout seconds to finish. From its start to the end of the manager's
    on_shutdown step a request for a VM that is not running gets 503 + Retry-After instead
    of a wake, so nothing resumes a VM that is being suspended.
    """
    edge.ctx.wakes_refused = True
    edge.manager.refuse_wakes()  # the control API's resume and exec too, not only the proxy's wakes
    edge.server.close()
    started = asyncio.get_running_loop().time()
    cut = await edge.ctx.drain(edge.cfg.server.drain_timeout)
    log.event("edge.drained", seconds=round(asyncio.get_running_loop().time() - started, 3), cut=cut)
    await edge.reaper.stop()
    edge.ctx.pool.close()
    edge.ctx.trimmer.close()
    await edge.control.cleanup()
    await edge.manager.close()
    if edge.webhooks is not None:
        await edge.webhooks.stop()
    await edge.egress.close_all()
    edge.control_dir.cleanup()
    log.event("edge.stopped")


def serve(cfg: EdgeConfig, lock_fd: int | None = None) -> None:
    """Run until SIGINT or SIGTERM (`mvm serve --workers 1`)."""
    uvloop.run(_serve_until_signalled(cfg, lock_fd))


async def _serve_until_signalled(cfg: EdgeConfig, lock_fd: int | None) -> None:
    edge = await start(cfg, lock_fd)
    scheme = "https" if cfg.server.tls else "http"
    print(f"microvm-edge listening on {scheme}://{cfg.server.listen_host}:{edge.port} "
          f"(control API: Host {cfg.server.control_host}); Ctrl-C stops", flush=True)  # fmt: skip
    await until_signalled()
    await stop(edge)


async def until_signalled() -> None:
    """Return on the first SIGINT or SIGTERM: every role then runs its own orderly stop."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()


def raise_nofile_limit(wanted: int) -> int:
    """Each client costs one descriptor and each request in flight another: raise the soft
    RLIMIT_NOFILE to min(hard, wanted) (never lower it); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if wanted and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.event("edge.rlimit_nofile", level="warning", soft=soft, hard=hard, wanted=wanted, error=str(exc))
            return soft
        soft = target
    log.event("edge.rlimit_nofile", soft=soft, hard=hard, wanted=wanted)
    return soft


def proxy_context(
    cfg: EdgeConfig,
    backend: VmBackend,
    tokens: TokenService,
    metrics: Metrics,
    control_socket: str,
    open_work: OpenWork | None = None,
) -> ProxyContext:
    """What every client connection of this process shares (`mvm serve` and fleet edge workers alike).

    `open_work`: where open streams are counted, the VM manager's own when it runs in this process.
    """
    return ProxyContext(
        backend=backend,
        router=HostnameRouter(cfg.server.domain, cfg.server.control_host),
        tokens=tokens,
        metrics=metrics,
        pool=UpstreamPool(cfg.proxy.upstream_keepalive_per_vm, cfg.proxy.upstream_keepalive_idle),
        control_socket=control_socket,
        control_auth=f"Bearer {cfg.server.admin_key}".encode(),
        settings=cfg.proxy,
        open_streams=OpenWork() if open_work is None else open_work,
    )


def bind_listener(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The listening socket, bound up front so a busy port is an error before any VM is touched.

    `reuse_port`: edge workers in several processes share the port (SO_REUSEPORT).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=1024, reuse_port=reuse_port)
    except OSError as exc:
        raise ConfigError(f"server.listen_port: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


async def ensure_default_template(manager: VmManager) -> None:
    """No VM ever cold-boots on the request path: the default template is made at start-up."""
    name = manager.settings.default_template
    if any(t.name == name for t in manager.templates()):
        return
    try:
        image = manager.settings.default_image
        await manager.create_template(name, image, lambda line: log.event("template.progress", msg=line))
    except NotFound as exc:
        log.event("template.missing", level="warning", template=name, error=str(exc))


def end_upstreams(pool: UpstreamPool, rec: VmRecord) -> None:
    """Connections to a VM that stops running would only time out: close the idle ones, and
    those in use too when its QEMU goes away (a paused VM keeps them: they resume with it)."""
    if rec.state in GUEST_GOING_AWAY:
        pool.abort_vm(rec.id)
    elif rec.state is not VmState.RUNNING:
        pool.drop_vm(rec.id)
