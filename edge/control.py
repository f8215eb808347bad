"""The control API (aiohttp): create, list, pause, suspend, resume and delete VMs; issue tokens.

It listens on a unix socket; the front listener splices connections for the control host
name to it, so TLS and the public port are shared with the data plane. Every answer is
JSON, errors included: {"error": <code>, "message": <what is wrong>}.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from vmm.errors import VmmError
from vmm.events import EventRing
from vmm.jsonlog import log
from vmm.model import VmRecord
from vmm.template import check_name

from . import console, events_api, files_api, shell_api
from .backend import ManagedVms
from .checkpoint_api import forking, only, parse_from_checkpoint
from .errors_http import error_code
from .exec_api import ExecRequest, stream_exec
from .metrics import Metrics
from .openapi import OPENAPI
from .paging import page, page_request
from .settings import ServerConfig
from .tokens import TokenService

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_PUBLIC = ("/healthz", "/metrics", "/openapi.json")

MANAGER = web.AppKey("manager", ManagedVms)
TOKENS = web.AppKey("tokens", TokenService)
METRICS = web.AppKey("metrics", Metrics)
SERVER = web.AppKey("server", ServerConfig)  # [server]: the admin key, and what VM URLs are made of


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(status: int, message: str) -> web.Response:
    """The same {"error", "message"} body and codes as the proxy's own answers."""
    return json_response({"error": error_code(status), "message": message}, status)


@web.middleware
async def errors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Admin bearer key (or the web console's session) on everything but the public paths; every failure becomes JSON.

    The console's own paths check its session themselves (its page and sign-in need none).
    """
    if request.path not in _PUBLIC and not console.is_console_path(request.path):
        expected = f"Bearer {request.app[SERVER].admin_key}".encode()
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            refusal = console.session_refusal(request)
            if refusal is not None:
                return error_response(*refusal)
    try:
        return await handler(request)
    except VmmError as exc:
        return error_response(exc.http_status, str(exc))
    except web.HTTPException as exc:
        return error_response(exc.status, exc.reason or exc.text or "")
    except Exception as exc:
        log.event("control.error", level="error", path=request.path, error=repr(exc))
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


async def read_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise web.HTTPBadRequest(reason=f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(reason="request body must be a JSON object")
    return data


def vm_json(request: web.Request, rec: VmRecord) -> dict[str, Any]:
    data = rec.to_dict()
    data["url"] = vm_url(request.app[SERVER], rec.id)
    return data


def vm_url(server: ServerConfig, vm_id: str) -> str:
    scheme = "https" if server.tls else "http"
    return f"{scheme}://{vm_id}.{server.domain}:{server.listen_port}/"


async def healthz(request: web.Request) -> web.Response:
    return json_response({"ok": True})


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def openapi(request: web.Request) -> web.Response:
    return json_response(OPENAPI)


async def list_templates(request: web.Request) -> web.Response:
    return json_response({"templates": [t.to_dict() for t in request.app[MANAGER].templates()]})


async def create_template(request: web.Request) -> web.Response:
    body = await read_body(request)
    if "from_vm" in body:
        only(body, "name", "from_vm", "checkpoint")
        name, vm_id, checkpoint = body.get("name"), body["from_vm"], body.get("checkpoint")
        if not isinstance(name, str) or not isinstance(vm_id, str) or not isinstance(checkpoint, str | None):
            raise web.HTTPUnprocessableEntity(reason="name, from_vm and checkpoint must be strings")
        tpl = await forking(request.app[MANAGER]).create_template_from(name, vm_id, checkpoint)
        return json_response(tpl.to_dict(), 201)
    name, image = body.get("name"), body.get("image", "demo")
    if not isinstance(name, str) or not isinstance(image, str):
        raise web.HTTPUnprocessableEntity(reason="name and image must be strings")
    tpl = await request.app[MANAGER].create_template(name, image, lambda _: None)
    return json_response(tpl.to_dict(), 201)


async def delete_template(request: web.Request) -> web.Response:
    request.app[MANAGER].remove_template(request.match_info["name"])
    return web.Response(status=204)


async def list_images(request: web.Request) -> web.Response:
    return json_response({"images": [i.to_dict() for i in request.app[MANAGER].images()]})


async def delete_image(request: web.Request) -> web.Response:
    request.app[MANAGER].remove_image(request.match_info["name"])
    return web.Response(status=204)


async def vm_logs(request: web.Request) -> web.StreamResponse:
    """The VM's app output: the last `tail` bytes, then (with follow=1) new output as it comes."""
    manager = request.app[MANAGER]
    vm_id = request.match_info["vm_id"]
    app_log = manager.app_log(vm_id)
    try:
        tail = int(request.query.get("tail", "65536"))
    except ValueError:
        raise web.HTTPUnprocessableEntity(reason="tail must be a whole number of bytes") from None
    follow = request.query.get("follow", "0") in ("1", "true")
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await response.prepare(request)
    await response.write(app_log.tail(max(0, tail)))
    if follow:
        async for chunk in app_log.follow(lambda: manager.lookup(vm_id) is not None):
            await response.write(chunk)
    await response.write_eof()
    return response


async def vm_metrics(request: web.Request) -> web.Response:
    """GET /v1/vms/{id}/metrics: what the VM uses now (vmm.usage)."""
    return json_response(request.app[MANAGER].usage(request.match_info["vm_id"]).to_dict())


async def vm_exec(request: web.Request) -> web.StreamResponse:
    req = ExecRequest.parse(await read_body(request))
    return await stream_exec(request, request.app[MANAGER], request.match_info["vm_id"], req)


async def create_vm(request: web.Request) -> web.Response:
    body = await read_body(request)
    if "from_checkpoint" in body:
        only(body, "from_checkpoint", "policy")
        vm_id, name = parse_from_checkpoint(body["from_checkpoint"])
        children = await forking(request.app[MANAGER]).fork(vm_id, 1, body.get("policy"), name)
        return json_response(vm_json(request, children[0]), 201)
    only(body, "template", "policy", "run_payload", "from_checkpoint")
    template, policy = body.get("template"), body.get("policy")
    if template is not None:
        check_name(template)  # the same check as the edge of a fleet makes
    if policy is not None and not isinstance(policy, dict):
        raise web.HTTPUnprocessableEntity(reason="policy must be an object")
    rec = await request.app[MANAGER].create_vm(template, policy, body.get("run_payload"))
    return json_response(vm_json(request, rec), 201)


async def list_vms(request: web.Request) -> web.Response:
    """One page of the VMs, oldest first (edge.paging): `?limit=N&cursor=<next of the page before>`."""
    wanted = page_request(request.query, request.app[SERVER].list_page_size)
    vms, after = page(request.app[MANAGER].list_vms(), wanted)
    return json_response({"vms": [vm_json(request, rec) for rec in vms], "next": after})


async def get_vm(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    data = vm_json(request, manager.get(request.match_info["vm_id"]))
    if data["state"] != "terminated" and hasattr(manager, "disk_usage"):
        data["disk"] = forking(manager).disk_usage(data["id"])
    return json_response(data)


async def create_checkpoint(request: web.Request) -> web.Response:
    body = await read_body(request)
    only(body, "name")
    ckpt = await forking(request.app[MANAGER]).create_checkpoint(request.match_info["vm_id"], body.get("name"))  # type: ignore[arg-type]
    return json_response(ckpt.to_dict(), 201)


async def list_checkpoints(request: web.Request) -> web.Response:
    found = forking(request.app[MANAGER]).list_checkpoints(request.match_info["vm_id"])
    return json_response({"checkpoints": [c.to_dict() for c in found]})


async def delete_checkpoint(request: web.Request) -> web.Response:
    await forking(request.app[MANAGER]).delete_checkpoint(request.match_info["vm_id"], request.match_info["name"])
    return web.Response(status=204)


async def rewind_vm(request: web.Request) -> web.Response:
    body = await read_body(request)
    only(body, "checkpoint")
    name = body.get("checkpoint")
    if not isinstance(name, str):
        raise web.HTTPUnprocessableEntity(reason="checkpoint (the name of one of the VM's checkpoints) is required")
    rec = await forking(request.app[MANAGER]).rewind(request.match_info["vm_id"], name)
    return json_response(vm_json(request, rec))


async def fork_vm(request: web.Request) -> web.Response:
    body = await read_body(request)
    only(body, "count", "policy", "checkpoint")
    if "count" not in body:
        raise web.HTTPUnprocessableEntity(reason="count (how many children, 1 to 32) is required")
    checkpoint = body.get("checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise web.HTTPUnprocessableEntity(reason="checkpoint must be a checkpoint's name")
    children = await forking(request.app[MANAGER]).fork(
        request.match_info["vm_id"], body["count"], body.get("policy"), checkpoint
    )
    return json_response({"vms": [vm_json(request, rec) for rec in children]}, 201)


def _action(name: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        vms = request.app[MANAGER]
        transitions = {"pause": vms.pause, "suspend": vms.suspend, "resume": vms.resume}
        rec = await transitions[name](request.match_info["vm_id"])
        return json_response(vm_json(request, rec))

    return handler


async def delete_vm(request: web.Request) -> web.Response:
    await request.app[MANAGER].delete(request.match_info["vm_id"])
    return web.Response(status=204)


async def issue_token(request: web.Request) -> web.Response:
    vm_id = request.match_info["vm_id"]
    request.app[MANAGER].get(vm_id)
    return await token_answer(request, vm_id)


async def token_answer(request: web.Request, vm_id: str) -> web.Response:
    """Issue a token for `vm_id` (which exists) as the body asks: {"ttl"?, "scopes"?, "ports"?}."""
    body = await read_body(request)
    ttl = body.get("ttl")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)):
        raise web.HTTPUnprocessableEntity(reason="ttl must be a number of seconds")
    only(body, "ttl", "scopes", "ports")
    token, exp = request.app[TOKENS].issue(vm_id, ttl, body.get("scopes"), body.get("ports"))
    url = vm_url(request.app[SERVER], vm_id)
    scopes = sorted(body.get("scopes") or ["http"])
    return json_response(
        {"vm": vm_id, "token": token, "expires_at": exp, "expires_in": round(exp - time.time()), "url": url,
         "scopes": scopes, "ports": str(body.get("ports", "all"))}, 201,
    )  # fmt: skip


def build_control_app(
    server: ServerConfig, manager: ManagedVms, tokens: TokenService, metrics_: Metrics,
    events: EventRing | None = None, keepalive: float = 15.0,
) -> web.Application:
    """The control API; `events`: the feed GET /v1/events serves (its [events] keepalive)."""
    app = web.Application(middlewares=[errors_and_auth], client_max_size=24 * 1024**2)  # exec stdin: 16 MiB, base64
    app[SERVER], app[MANAGER], app[TOKENS], app[METRICS] = server, manager, tokens, metrics_
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/v1/templates", list_templates)
    app.router.add_post("/v1/templates", create_template)
    app.router.add_delete("/v1/templates/{name}", delete_template)
    app.router.add_get("/v1/images", list_images)
    app.router.add_delete("/v1/images/{name}", delete_image)
    app.router.add_get("/v1/vms/{vm_id}/logs", vm_logs)
    app.router.add_get("/v1/vms/{vm_id}/metrics", vm_metrics)
    app.router.add_post("/v1/vms/{vm_id}/exec", vm_exec)
    files_api.add_routes(app, manager)
    shell_api.add_routes(app, manager)
    console.add_routes(app, server, server.console_session_ttl)
    app.router.add_get("/v1/vms", list_vms)
    app.router.add_post("/v1/vms", create_vm)
    app.router.add_get("/v1/vms/{vm_id}", get_vm)
    app.router.add_delete("/v1/vms/{vm_id}", delete_vm)
    for action in ("pause", "suspend", "resume"):
        app.router.add_post(f"/v1/vms/{{vm_id}}/{action}", _action(action))
    app.router.add_post("/v1/vms/{vm_id}/tokens", issue_token)
    if events is not None:
        events_api.add_routes(app, events, keepalive)
    app.router.add_post("/v1/vms/{vm_id}/checkpoints", create_checkpoint)
    app.router.add_get("/v1/vms/{vm_id}/checkpoints", list_checkpoints)
    app.router.add_delete("/v1/vms/{vm_id}/checkpoints/{name}", delete_checkpoint)
    app.router.add_post("/v1/vms/{vm_id}/restore", rewind_vm)
    app.router.add_post("/v1/vms/{vm_id}/fork", fork_vm)
    return app
