"""/mcp mounted on an aiohttp app (edge/mcp_http.py): the SDK's HTTP client in, the tools' calls out
through the app's own unix socket with the admin key, and the session manager stopped with the app."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from edge import mcp_http


async def test_tools_over_http_call_the_app_on_its_socket(tmp_path: Path) -> None:
    seen: list[str] = []

    async def list_vms(request: web.Request) -> web.Response:
        seen.append(request.headers["Authorization"])
        return web.json_response({"vms": [{"id": "vm1", "state": "running", "template": "t", "url": "u"}]})

    app = web.Application()
    app.router.add_get("/v1/vms", list_vms)
    socket = str(tmp_path / "control.sock")
    mcp_http.mount(app, socket, "admin-key")
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.UnixSite(runner, socket).start()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        async with Client(streamable_http_client(f"http://127.0.0.1:{port}{mcp_http.PATH}")) as mcp:
            listed = await mcp.call_tool("list_sandboxes", {})
            assert listed.structured_content == {"result": [{"id": "vm1", "state": "running", "template": "t",
                                                             "url": "u"}]}  # fmt: skip
            missing = await mcp.call_tool("suspend", {"vm": "vm1"})
            assert missing.is_error  # the app has no such route: a tool error, the session goes on
            assert (await mcp.call_tool("list_sandboxes", {})).structured_content is not None
        assert seen == ["Bearer admin-key", "Bearer admin-key"]
    finally:
        await runner.cleanup()
