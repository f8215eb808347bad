"""The MCP tools over a fake SDK client: schemas, API errors as tool errors, the port link."""

from __future__ import annotations

import builtins
from typing import Any

from mcp import Client
from mcp.types import TextContent

from microvm_edge import AsyncClient, ExecResult, Token, Vm
from microvm_edge.errors import NotFound
from microvm_edge.mcp_server import _port_url, build_server


class FakeApi(AsyncClient):
    """One VM, `vm1`; any other id is the API's 404."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:1", "key")
        self.calls: builtins.list[tuple[Any, ...]] = []

    def _vm(self, vm_id: str) -> Vm:
        if vm_id != "vm1":
            raise NotFound(404, "not_found", f"no such VM {vm_id!r}")
        return Vm("vm1", "running", "sandbox", "https://vm1.mvm.localhost:8443/", {})

    async def list(self) -> builtins.list[Vm]:
        return [self._vm("vm1")]

    async def run(self, vm_id: str, argv: builtins.list[str], **options: Any) -> ExecResult:
        self._vm(vm_id)
        self.calls.append(("run", argv, options))
        return ExecResult(b"out", b"", 3)

    async def token(self, vm_id: str, ttl: float | None = None, scopes: Any = None, ports: str | None = None) -> Token:
        self._vm(vm_id)
        self.calls.append(("token", ttl, ports))
        return Token("tok", 1.0, "https://vm1.mvm.localhost:8443/")


    async def fork(
        self, vm_id: str, count: int = 1, policy: dict[str, Any] | None = None, checkpoint: str | None = None
    ) -> builtins.list[Vm]:
        self._vm(vm_id)
        self.calls.append(("fork", count, checkpoint))
        return [Vm(f"child{i}", "running", "sandbox", f"https://child{i}.mvm.localhost/", {}) for i in range(count)]


def text(result: Any) -> str:
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


async def test_tools_have_schemas_and_api_errors_are_tool_errors() -> None:
    api = FakeApi()
    async with Client(build_server(api)) as mcp:
        tools = {t.name: t for t in (await mcp.list_tools()).tools}
        assert tools["exec"].input_schema["required"] == ["vm", "argv"]
        assert tools["run_code"].input_schema["properties"]["language"]["default"] == "python"

        missing = await mcp.call_tool("exec", {"vm": "nope", "argv": ["true"]})
        assert missing.is_error and text(missing).endswith("no such VM 'nope'")
        ruby = await mcp.call_tool("run_code", {"vm": "vm1", "code": "1", "language": "ruby"})
        assert ruby.is_error and "only python" in text(ruby)
        no_argv = await mcp.call_tool("exec", {"vm": "vm1", "argv": []})
        assert no_argv.is_error and "argv must name a command" in text(no_argv)

        done = await mcp.call_tool("exec", {"vm": "vm1", "argv": ["sh"], "stdin": "x", "timeout": 5})
        assert done.structured_content == {"exit_code": 3, "signal": None, "stdout": "out", "stderr": ""}
        assert api.calls[-1] == ("run", ["sh"], {"stdin": b"x", "timeout": 5.0})


async def test_get_url_names_the_port_in_the_host_name() -> None:
    api = FakeApi()
    async with Client(build_server(api)) as mcp:
        link = await mcp.call_tool("get_url", {"vm": "vm1", "port": 8080, "ttl": 30})
        assert link.structured_content == {"url": "https://8080-vm1.mvm.localhost:8443/?token=tok", "expires_at": 1.0}
        assert api.calls[-1] == ("token", 30, "8080")
    assert _port_url("http://vm1.example.com/", 9000) == "http://9000-vm1.example.com/"


async def test_fork_gives_the_children_and_bounds_the_count() -> None:
    api = FakeApi()
    async with Client(build_server(api)) as mcp:
        forked = await mcp.call_tool("fork", {"vm": "vm1", "count": 2, "checkpoint": "a"})
        assert [child["id"] for child in forked.structured_content["result"]] == ["child0", "child1"]
        assert api.calls[-1] == ("fork", 2, "a")
        too_many = await mcp.call_tool("fork", {"vm": "vm1", "count": 33})
        assert too_many.is_error
        gone = await mcp.call_tool("fork", {"vm": "nope"})
        assert gone.is_error and text(gone).endswith("no such VM 'nope'")


async def test_an_unreachable_control_api_is_a_tool_error() -> None:
    async with AsyncClient("http://127.0.0.1:1", "key") as api, Client(build_server(api)) as mcp:
        down = await mcp.call_tool("list_sandboxes", {})
        assert down.is_error and "cannot reach 127.0.0.1:1" in text(down) and "mvm serve" in text(down)
