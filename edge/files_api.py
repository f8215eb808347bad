"""GET/PUT/DELETE /v1/vms/{id}/files?path=...: a VM's files, streamed any size, through its agent.

The guest side is `/mvm/init file-get|file-put|file-delete PATH` (guest/init/files.c) run
with the agent's exec, so it works in every disk image whatever tools the image has:
- GET streams a file's bytes, or answers a directory's listing as JSON (name, type, size,
  mode, mtime);
- PUT streams the request body into a temporary file beside the target, then renames it;
- DELETE removes a file or an empty directory (never `/`).
A guest errno becomes the matching HTTP error with the guest's message.

`?timeout=` (seconds, exec's bounds and default) bounds every wait on the guest agent: its next
output, and its taking the next chunk of an upload. An agent that stays silent that long gets
a 504 naming the VM and the timeout, and the tool is killed. An upload cut short for any reason
leaves nothing in the guest: file-put writes into an unnamed file and names it only once complete.
"""

from __future__ import annotations

import asyncio
import errno
import posixpath
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import orjson
from aiohttp import web

from vmm.agent import AgentError, Exec, ExecEvent
from vmm.errors import Conflict, InvalidRequest, NotFound, OverCapacity, PermissionDenied, VmmError
from vmm.jsonlog import log
from vmm.vm_files import GUEST_TOOL

from .backend import ManagedVms
from .exec_api import DEFAULT_TIMEOUT, MAX_TIMEOUT

T = TypeVar("T")

_ERRORS: dict[int, type[VmmError]] = {
    errno.ENOENT: NotFound, errno.EACCES: PermissionDenied, errno.EPERM: PermissionDenied,
    errno.EISDIR: Conflict, errno.ENOTDIR: Conflict, errno.ENOTEMPTY: Conflict, errno.EEXIST: Conflict,
    errno.ENOSPC: OverCapacity, errno.EDQUOT: OverCapacity, errno.EINVAL: InvalidRequest,
    errno.ENAMETOOLONG: InvalidRequest, errno.EROFS: PermissionDenied, errno.EBUSY: Conflict,
}  # fmt: skip


class AgentTimeout(VmmError):
    """The guest agent did not answer a files call within its timeout."""

    http_status = 504


def _path(request: web.Request) -> str:
    path = request.query.get("path", "")
    if not path.startswith("/") or "\0" in path:
        raise InvalidRequest("path must be an absolute path in the guest, e.g. ?path=/data/notes.txt")
    return path


def _timeout(request: web.Request) -> float:
    """`?timeout=` in seconds, with exec's bounds and default."""
    text = request.query.get("timeout")
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= MAX_TIMEOUT:
        raise InvalidRequest(f"timeout must be a number of seconds in (0, {MAX_TIMEOUT:.0f}], got {text!r}")
    return value


class _Agent:
    """One tool's exec, every wait on the agent bounded by the call's timeout."""

    def __init__(self, vm_id: str, ex: Exec, timeout: float) -> None:
        self.vm_id, self.ex, self.timeout = vm_id, ex, timeout

    async def _bounded(self, step: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(step, self.timeout)
        except TimeoutError:
            raise AgentTimeout(
                f"VM {self.vm_id}: the guest agent did not answer within the timeout of {self.timeout:g} s"
            ) from None

    async def write(self, data: bytes) -> None:
        await self._bounded(self.ex.write_stdin(data))

    async def events(self) -> AsyncIterator[ExecEvent]:
        events = aiter(self.ex)
        while not self.ex.finished:
            yield await self._bounded(anext(events))


def _error(code: int, stderr: bytes) -> VmmError:
    message = stderr.decode(errors="replace").strip() or f"guest error {code}"
    return _ERRORS.get(code, VmmError)(message)


async def _finish(agent: _Agent) -> None:
    """Wait for the tool's exit; a failure becomes the HTTP error its errno means."""
    stderr = b""
    async for event in agent.events():
        if event.kind == "stderr":
            stderr += event.data
        elif event.kind == "error":
            raise AgentError(f"the guest agent failed: {event.data.decode(errors='replace')}")
        elif event.kind == "exit" and event.code != 0:
            raise _error(event.code, stderr)


class FilesApi:
    """The three handlers, bound to the manager that runs the tools."""

    def __init__(self, manager: ManagedVms) -> None:
        self.manager = manager

    async def _start(self, request: web.Request, tool: str) -> tuple[str, str, _Agent]:
        vm_id, path, timeout = request.match_info["vm_id"], _path(request), _timeout(request)
        if tool == "file-delete" and posixpath.normpath(path).strip("/") == "":
            raise InvalidRequest(f"path: {path} is the root directory, which cannot be removed")
        ex = await self.manager.exec(vm_id, [GUEST_TOOL, tool, path], [], "/", 0, 0)
        return vm_id, path, _Agent(vm_id, ex, timeout)

    async def get(self, request: web.Request) -> web.StreamResponse:
        vm_id, path, agent = await self._start(request, "file-get")
        ex = agent.ex
        response: web.StreamResponse | None = None
        listing = bytearray()
        stderr = b""
        with self.manager.busy(vm_id):
            try:
                await agent.write(b"")
                async for event in agent.events():
                    if event.kind == "stdout":
                        data = event.data
                        if response is None and not listing and data[:1] == b"F":
                            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
                            await response.prepare(request)
                            data = data[1:]
                        elif response is None and not listing:
                            data = data[1:]  # "D": a directory listing follows
                            listing += b"\n"
                        if response is not None:
                            await response.write(data)
                        else:
                            listing += data
                    elif event.kind == "stderr":
                        stderr += event.data
                    elif event.kind == "error" or event.code != 0:
                        if response is not None:  # headers are out: the client sees a cut stream
                            raise ConnectionAbortedError(f"reading {path} failed midway")
                        if event.kind == "error":
                            raise AgentError(f"the guest agent failed: {event.data.decode(errors='replace')}")
                        raise _error(event.code, stderr)
            finally:
                if not ex.finished:
                    await ex.abandon()
        if response is not None:
            await response.write_eof()
            return response
        entries = [orjson.loads(line) for line in bytes(listing).splitlines() if line]
        return web.Response(body=orjson.dumps({"path": path, "entries": entries}), content_type="application/json")

    async def put(self, request: web.Request) -> web.Response:
        vm_id, path, agent = await self._start(request, "file-put")
        size = 0
        with self.manager.busy(vm_id):
            try:
                try:
                    async for chunk in request.content.iter_chunked(1 << 16):
                        size += len(chunk)
                        await agent.write(chunk)
                except ConnectionError as exc:  # the client left (or the edge cut it off, e.g. its 408)
                    log.event("files.upload_cut", vm=vm_id, path=path, bytes=size, error=str(exc))
                    raise web.HTTPBadRequest(reason=f"the upload of {path} was cut short after {size} bytes") from None
                await agent.write(b"")
                await _finish(agent)
            finally:
                if not agent.ex.finished:
                    await agent.ex.abandon()
        return web.Response(body=orjson.dumps({"path": path, "bytes": size}), status=201,
                            content_type="application/json")  # fmt: skip

    async def delete(self, request: web.Request) -> web.Response:
        vm_id, _, agent = await self._start(request, "file-delete")
        with self.manager.busy(vm_id):
            try:
                await agent.write(b"")
                await _finish(agent)
            finally:
                if not agent.ex.finished:
                    await agent.ex.abandon()
        return web.Response(status=204)


def add_routes(app: web.Application, manager: ManagedVms) -> None:
    files = FilesApi(manager)
    app.router.add_get("/v1/vms/{vm_id}/files", files.get)
    app.router.add_put("/v1/vms/{vm_id}/files", files.put)
    app.router.add_delete("/v1/vms/{vm_id}/files", files.delete)
