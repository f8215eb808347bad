"""The MCP server: microVM sandboxes as tools for AI agents (the official `mcp` SDK's MCPServer).

Every tool is one or two control API calls through the Python SDK (microvm_edge), so the same
server runs over stdio (`mvm mcp`, a client of a running `mvm serve`) and over streamable HTTP on
the control API itself (edge/mcp_http.py, a client of its own control socket). API errors
become tool errors whose text is the API's own message (an unknown VM: "no such VM ..."), never
a crash of the session. A tool call on a suspended VM wakes it, as the control API does.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from .client import AsyncClient, Vm
from .errors import ApiError
from .repl import run_python

T = TypeVar("T")
VmId = Annotated[str, Field(description="the VM's id, e.g. vabc234def56 (see list_sandboxes)")]
INSTRUCTIONS = (
    "Sandboxes are QEMU microVMs: create one from a template (python-sandbox images have python3), run code "
    "or commands in it, read and write its files. Idle ones are suspended to disk and wake on the next call "
    "with memory, files and processes intact."
)
MAX_TEXT = 1 << 20  # stdout/stderr/file text handed back per call; more is cut with a note


def vm_dict(vm: Vm) -> dict[str, Any]:
    return {"id": vm.id, "state": vm.state, "template": vm.template, "url": vm.url}


def build_server(client: AsyncClient) -> MCPServer:
    """The tools and resources, all over `client` (whose lifetime the caller owns)."""
    mcp = MCPServer("microvm-edge", instructions=INSTRUCTIONS)
    readonly = ToolAnnotations(read_only_hint=True)

    async def api(call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except ApiError as exc:
            raise ToolError(exc.message if exc.status else f"{exc.message}: is `mvm serve` running?") from None

    @mcp.tool()
    async def create_sandbox(
        template: Annotated[str, Field(description="template to launch from, e.g. sandbox")],
        policy: Annotated[
            dict[str, Any] | None, Field(description='lifecycle policy, e.g. {"idle_suspend_after": 60}')
        ] = None,
    ) -> dict[str, Any]:
        """Launch a new sandbox VM from a template (a snapshot: no cold boot); returns its id, state and URL."""
        return vm_dict(await api(lambda: client.create(template, policy)))

    @mcp.tool(annotations=readonly)
    async def list_sandboxes() -> list[dict[str, Any]]:
        """Every sandbox VM: id, state (running, paused, suspended, ...), template and URL."""
        return [vm_dict(vm) for vm in await api(client.list)]

    @mcp.tool()
    async def run_code(
        vm: VmId,
        code: Annotated[str, Field(description="the code; the value of a final expression is returned as result")],
        language: Annotated[str, Field(description="only python")] = "python",
    ) -> dict[str, Any]:
        """Run code in the VM in a namespace that lives as long as the VM (variables, imports, functions stay).

        Returns stdout, stderr, result (repr of the final expression) and error (the traceback, if it raised)."""
        if language.lower() not in ("python", "python3", "py"):
            raise ToolError(f"language {language!r} is not supported: only python (run others with exec)")
        done = await api(lambda: run_python(client, vm, code))
        return {"stdout": _cut(done.stdout), "stderr": _cut(done.stderr), "result": done.result, "error": done.error}

    @mcp.tool(name="exec")
    async def exec_(
        vm: VmId,
        argv: Annotated[list[str], Field(description='the command and its arguments, e.g. ["ls", "-l", "/"]')],
        stdin: Annotated[str | None, Field(description="text given to its standard input")] = None,
        timeout: Annotated[float, Field(description="seconds before its process group is killed", gt=0)] = 60.0,
    ) -> dict[str, Any]:
        """Run a command in the VM as root and wait for it: exit_code, stdout, stderr (and the signal if killed)."""
        if not argv:
            raise ToolError('argv must name a command, e.g. ["ls", "-l"]')
        stdin_bytes = (stdin or "").encode()
        done = await api(lambda: client.run(vm, argv, stdin=stdin_bytes, timeout=timeout))
        out, err = (_cut(data.decode(errors="replace")) for data in (done.stdout, done.stderr))
        return {"exit_code": done.exit_code, "signal": done.signal, "stdout": out, "stderr": err}

    @mcp.tool(annotations=readonly)
    async def read_file(vm: VmId, path: Annotated[str, Field(description="absolute path in the VM")]) -> dict[str, Any]:
        """Read a file of the VM: UTF-8 text as is, anything else base64 (encoding says which)."""
        data = await api(lambda: client.read_file(vm, path))
        if len(data) > MAX_TEXT:
            raise ToolError(f"{path} has {len(data)} bytes: more than {MAX_TEXT} (copy it with `mvm cp`)")
        try:
            return {"path": path, "encoding": "utf-8", "content": data.decode()}
        except UnicodeDecodeError:
            return {"path": path, "encoding": "base64", "content": base64.b64encode(data).decode()}

    @mcp.tool()
    async def write_file(
        vm: VmId,
        path: Annotated[str, Field(description="absolute path in the VM; its directory must exist")],
        content: str,
        encoding: Annotated[str, Field(description="utf-8 (content is text) or base64")] = "utf-8",
    ) -> dict[str, Any]:
        """Write a whole file in the VM, atomically (readers never see half of it); returns its size."""
        if encoding not in ("utf-8", "base64"):
            raise ToolError(f"encoding {encoding!r}: must be utf-8 or base64")
        try:
            data = base64.b64decode(content, validate=True) if encoding == "base64" else content.encode()
        except binascii.Error:
            raise ToolError("content is not valid base64") from None
        size = await api(lambda: client.write_file(vm, path, data))
        return {"path": path, "bytes": size}

    @mcp.tool(annotations=readonly)
    async def list_files(
        vm: VmId, path: Annotated[str, Field(description="absolute directory path in the VM")] = "/"
    ) -> list[dict[str, Any]]:
        """A directory's entries in the VM: name, type, size, mode, mtime."""
        return await api(lambda: client.list_files(vm, path))

    @mcp.tool()
    async def suspend(vm: VmId) -> dict[str, Any]:
        """Snapshot the VM to disk and stop it; the next call that needs it wakes it with everything intact."""
        return vm_dict(await api(lambda: client.suspend(vm)))

    @mcp.tool()
    async def resume(vm: VmId) -> dict[str, Any]:
        """Wake a paused or suspended VM now (any other tool call on it would wake it too)."""
        return vm_dict(await api(lambda: client.resume(vm)))

    @mcp.tool(annotations=ToolAnnotations(destructive_hint=True))
    async def delete(vm: VmId) -> dict[str, Any]:
        """Terminate the VM and remove its memory, disk and files for good."""
        await api(lambda: client.delete(vm))
        return {"deleted": vm}

    @mcp.tool()
    async def fork(
        vm: VmId,
        count: Annotated[int, Field(description="how many copies", ge=1, le=32)] = 1,
        checkpoint: Annotated[str | None, Field(description="start from this checkpoint, not from now")] = None,
    ) -> list[dict[str, Any]]:
        """New VMs that continue from the VM's moment now (memory, disk, processes), each its own from then on:
        try several approaches at once, or keep a copy to go back to."""
        return [vm_dict(child) for child in await api(lambda: client.fork(vm, count, checkpoint=checkpoint))]

    @mcp.tool()
    async def get_url(
        vm: VmId,
        port: Annotated[int | None, Field(description="a guest port on the VM's allow-list (default its app)")] = None,
        ttl: Annotated[int, Field(description="seconds the link works", gt=0)] = 300,
    ) -> dict[str, Any]:
        """A short-lived link to the VM's app (or one port): opening it in a browser sets a cookie for the VM."""
        ports = None if port is None else str(port)
        token = await api(lambda: client.token(vm, ttl=ttl, ports=ports))
        url = token.url if port is None else _port_url(token.url, port)
        return {"url": f"{url}?token={token.token}", "expires_at": token.expires_at}

    @mcp.resource("mvm://vms/{vm}/log", mime_type="text/plain")
    async def app_log(vm: str) -> str:
        """The VM's app output (stdout and stderr), its last 64 KiB."""
        try:
            return (await client.logs(vm)).decode(errors="replace")
        except ApiError as exc:
            raise ResourceError(exc.message) from None

    @mcp.resource("mvm://vms/{vm}/files/{+path}", mime_type="application/json")
    async def file_tree(vm: str, path: str) -> dict[str, Any]:
        """A directory of the VM and its subdirectories two levels down (at most 500 entries)."""
        try:
            return await _tree(client, vm, "/" + path.strip("/"), 2, [500])
        except ApiError as exc:
            raise ResourceError(exc.message) from None

    return mcp


async def _tree(client: AsyncClient, vm: str, path: str, depth: int, budget: list[int]) -> dict[str, Any]:
    entries = await client.list_files(vm, path)
    children: list[dict[str, Any]] = []
    for entry in entries:
        if budget[0] <= 0:
            children.append({"truncated": True})
            break
        budget[0] -= 1
        node = {k: entry.get(k) for k in ("name", "type", "size")}
        if entry.get("type") == "dir" and depth > 0:
            sub = await _tree(client, vm, f"{path.rstrip('/')}/{entry['name']}", depth - 1, budget)
            node["entries"] = sub["entries"]
        children.append(node)
    return {"path": path, "entries": children}


def _port_url(url: str, port: int) -> str:
    """`https://<vm>.<domain>:8443/` → `https://<port>-<vm>.<domain>:8443/` (the hostname form of a port)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{port}-{parts.netloc}"))


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f"\n[... {len(text) - MAX_TEXT} more characters cut]"
