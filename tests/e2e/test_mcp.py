"""The MCP server, driven by the `mcp` SDK's own client against a real edge and real guests.

One edge and one python-sandbox VM serve the whole module: over stdio (`mvm mcp` as a
subprocess, a client of that edge's control API) and over streamable HTTP (`/mcp` on the
control API, under the admin key).
"""

from __future__ import annotations

import json
import os
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
import pytest_asyncio
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent

from tests.e2e.edge_harness import CONTROL, edge_config, running_edge
from tests.e2e.edge_harness import Client as EdgeClient
from vmm.settings import VmmSettings

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Setup:
    edge: EdgeClient
    vm: str
    config: Path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup(module_settings: VmmSettings, sandbox_template: str) -> AsyncIterator[Setup]:
    cfg = edge_config(module_settings)
    async with running_edge(cfg) as edge:
        vm = await edge.api("POST", "/v1/vms", {"template": sandbox_template}, status=201)
        config = module_settings.state_dir / "mcp.toml"
        config.write_text(
            f'[server]\nlisten_port = {edge.edge.port}\ntls_cert = "{cfg.server.tls_cert}"\n'
            f'tls_key = "{cfg.server.tls_key}"\nadmin_key = "{cfg.server.admin_key}"\n'
        )
        yield Setup(edge, vm["id"], config)


def stdio_client(setup: Setup) -> Client:
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "mvm.cli", "mcp", "--config", str(setup.config)], env=env, cwd=str(REPO)
    )
    return Client(params)


def http_client(setup: Setup, key: str | None = None) -> tuple[httpx2.AsyncClient, str]:
    ssl_ctx = ssl.create_default_context(cafile=str(setup.edge.edge.cfg.server.tls_cert))
    ssl_ctx.check_hostname = False  # 127.0.0.1 in the URL; the Host header names the control API
    headers = {"Host": CONTROL, "Authorization": f"Bearer {key or setup.edge.edge.cfg.server.admin_key}"}
    http = httpx2.AsyncClient(headers=headers, verify=ssl_ctx, timeout=httpx2.Timeout(30.0, read=300.0))
    return http, f"https://127.0.0.1:{setup.edge.edge.port}/mcp"


def data(result: CallToolResult) -> Any:
    assert not result.is_error, text(result)
    assert result.structured_content is not None
    content = result.structured_content
    return content["result"] if set(content) == {"result"} else content


def text(result: CallToolResult) -> str:
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


async def test_stdio(setup: Setup) -> None:
    async with stdio_client(setup) as mcp:
        names = {tool.name for tool in (await mcp.list_tools()).tools}
        assert names >= {"create_sandbox", "list_sandboxes", "run_code", "exec", "read_file", "write_file",
                         "list_files", "suspend", "resume", "delete", "fork", "get_url"}  # fmt: skip

        made = data(await mcp.call_tool("create_sandbox", {"template": "sandbox"}))
        assert made["state"] == "running"
        assert made["id"] in {vm["id"] for vm in data(await mcp.call_tool("list_sandboxes", {}))}
        assert data(await mcp.call_tool("delete", {"vm": made["id"]})) == {"deleted": made["id"]}

        vm = setup.vm
        assert data(await mcp.call_tool("run_code", {"vm": vm, "code": "x = 41"}))["error"] is None
        ran = data(await mcp.call_tool("run_code", {"vm": vm, "code": "print('hi')\nx + 1"}))
        assert (ran["result"], ran["stdout"]) == ("42", "hi\n")

        wrote = data(await mcp.call_tool("write_file", {"vm": vm, "path": "/tmp/note.txt", "content": "héllo\n"}))
        assert wrote["bytes"] == len("héllo\n".encode())
        read = data(await mcp.call_tool("read_file", {"vm": vm, "path": "/tmp/note.txt"}))
        assert (read["content"], read["encoding"]) == ("héllo\n", "utf-8")
        assert "note.txt" in {e["name"] for e in data(await mcp.call_tool("list_files", {"vm": vm, "path": "/tmp"}))}

        done = data(await mcp.call_tool("exec", {"vm": vm, "argv": ["sh", "-c", "cat; echo err >&2; exit 3"],
                                                 "stdin": "in\n"}))  # fmt: skip
        assert (done["exit_code"], done["stdout"], done["stderr"]) == (3, "in\n", "err\n")

        # The Debian base carries the shell tools a person expects: ps and top (procps), less, vi.
        shell = "ps -e -o comm && for tool in top less vi; do command -v $tool; done"
        tools = data(await mcp.call_tool("exec", {"vm": vm, "argv": ["sh", "-c", shell]}))
        assert tools["exit_code"] == 0, tools
        lines = tools["stdout"].split()
        assert "python3" in lines and lines[-3:] == ["/usr/bin/top", "/usr/bin/less", "/usr/bin/vi"], tools

        unknown = await mcp.call_tool("run_code", {"vm": "vaaaaaaaaaaa", "code": "1"})
        assert unknown.is_error and "vaaaaaaaaaaa" in text(unknown), text(unknown)

        tree = await mcp.read_resource(f"mvm://vms/{vm}/files/tmp")
        assert "note.txt" in {e["name"] for e in json.loads(tree.contents[0].text)["entries"]}  # type: ignore[union-attr]
        log = await mcp.read_resource(f"mvm://vms/{vm}/log")
        assert log.contents[0].mime_type == "text/plain"


async def test_http(setup: Setup) -> None:
    http, url = http_client(setup)
    async with http, Client(streamable_http_client(url, http_client=http)) as mcp:
        vm = setup.vm
        data(await mcp.call_tool("run_code", {"vm": vm, "code": "y = 41"}))
        assert data(await mcp.call_tool("run_code", {"vm": vm, "code": "y + 1"}))["result"] == "42"

        unknown = await mcp.call_tool("exec", {"vm": "vaaaaaaaaaaa", "argv": ["true"]})
        assert unknown.is_error and "vaaaaaaaaaaa" in text(unknown), text(unknown)
        bad = await mcp.call_tool("run_code", {"vm": vm, "code": "1", "language": "ruby"})
        assert bad.is_error and "only python" in text(bad)

        # A call on a suspended VM wakes it, with its memory (the namespace) intact.
        assert data(await mcp.call_tool("suspend", {"vm": vm}))["state"] == "suspended"
        assert data(await mcp.call_tool("run_code", {"vm": vm, "code": "y * 2"}))["result"] == "82"
        assert (await setup.edge.api("GET", f"/v1/vms/{vm}"))["state"] == "running"

        link = data(await mcp.call_tool("get_url", {"vm": vm, "ttl": 60}))
        assert link["url"].startswith(f"https://{vm}.") and "?token=" in link["url"]

    wrong, url = http_client(setup, key="not-the-admin-key-at-all")
    async with wrong:
        answer = await wrong.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert answer.status_code == 401
