"""`/mcp` on the control API: the MCP server (microvm_edge.mcp_server) over streamable HTTP, under the admin key.

The route sits in the control app itself, behind its admin-key middleware, so it needs no auth
of its own. The SDK's transport is an ASGI callable (StreamableHTTPSessionManager.handle_request);
a small bridge hands it aiohttp's request and streams its answer back. It runs stateless with
JSON answers: every POST is one JSON-RPC exchange, nothing is kept between requests, so any edge
worker can serve any call. The tools reach the control API through its own unix socket with the
SDK, exactly as `mvm mcp` does over the network. The `mcp` SDK (about a second to import) is
loaded on the first /mcp request, not at start.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import MutableMapping
from typing import Any

import orjson
from aiohttp import web

from vmm.jsonlog import log

PATH = "/mcp"


class McpEndpoint:
    """The session manager and its client, made on first use and run in a task of their own (anyio's
    task group must be entered and left in one task)."""

    def __init__(self, control_socket: str, admin_key: str) -> None:
        self.control_socket, self.admin_key = control_socket, admin_key
        self._manager: Any = None
        self._starting = asyncio.Lock()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def manager(self) -> Any:
        async with self._starting:
            if self._manager is None:
                ready = asyncio.get_running_loop().create_future()
                self._task = asyncio.create_task(self._run(ready))
                self._manager = await ready
        return self._manager

    async def _run(self, ready: asyncio.Future[Any]) -> None:
        from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
        from mcp.server.transport_security import TransportSecuritySettings

        from microvm_edge import AsyncClient
        from microvm_edge.mcp_server import build_server

        client = AsyncClient("http://control", self.admin_key, unix_socket=self.control_socket)
        server = build_server(client)
        # The admin key already guards the route; DNS-rebinding checks would only refuse the real host names.
        security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
        server.streamable_http_app(json_response=True, stateless_http=True, transport_security=security)
        manager: StreamableHTTPSessionManager = server.session_manager
        try:
            async with manager.run():
                ready.set_result(manager)
                await self._stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise
        finally:
            await client.close()

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task


async def _handle(endpoint: McpEndpoint, request: web.Request) -> web.StreamResponse:
    manager = await endpoint.manager()
    response = web.StreamResponse()
    body_sent = False
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
        "scheme": "https", "path": request.path, "raw_path": request.raw_path.encode(), "root_path": "",
        "query_string": request.query_string.encode(),
        "headers": [(name.lower(), value) for name, value in request.raw_headers],
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body = await request.read()
            body_sent = True
            _log_call(body)
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect news: the handler's cancellation ends the exchange
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            response.set_status(message["status"])
            for name, value in message.get("headers", ()):
                response.headers.add(name.decode("latin-1"), value.decode("latin-1"))
            await response.prepare(request)
        elif message["type"] == "http.response.body":
            await response.write(message.get("body", b""))
            if not message.get("more_body", False):
                await response.write_eof()

    await manager.handle_request(scope, receive, send)
    if not response.prepared:
        log.event("mcp.no_answer", level="warning", method=request.method)
        raise web.HTTPInternalServerError(reason="the MCP transport gave no answer")
    return response


def _log_call(body: bytes) -> None:
    """One line per tool call, with its VM: who did what to which sandbox (the body is parsed again by the SDK)."""
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    if isinstance(message, dict) and message.get("method") == "tools/call" and isinstance(message.get("params"), dict):
        params = message["params"]
        arguments = params.get("arguments") if isinstance(params.get("arguments"), dict) else {}
        log.event("mcp.tool_call", tool=str(params.get("name"))[:64], vm=str(arguments.get("vm", ""))[:64] or None)


def mount(app: web.Application, control_socket: str, admin_key: str) -> None:
    """Add /mcp (GET, POST, DELETE) to the control app, before it is frozen; `control_socket` is where
    that same app listens, `admin_key` the key it checks."""
    endpoint = McpEndpoint(control_socket, admin_key)

    async def handler(request: web.Request) -> web.StreamResponse:
        return await _handle(endpoint, request)

    async def stop(_: web.Application) -> None:
        await endpoint.close()

    for method in ("GET", "POST", "DELETE"):
        app.router.add_route(method, PATH, handler)
    app.on_cleanup.append(stop)
