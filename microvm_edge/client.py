"""The Python SDK: AsyncClient (asyncio) and Client (the same calls, blocking).

    from microvm_edge import Client
    with Client("https://127.0.0.1:8443", admin_key="...", cafile="var/tls/dev.crt") as mvm:
        vm = mvm.create(template="sandbox")
        print(mvm.run(vm.id, ["python3", "-c", "print(6 * 7)"]).stdout)

Every call goes to the control API of a running `mvm serve` (or edge). Errors are typed
exceptions (microvm_edge.errors) carrying the API's error code.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import orjson

from .errors import ApiError, ExecFailed, error_for

T = TypeVar("T")


@dataclass(frozen=True)
class Vm:
    id: str
    state: str
    template: str
    url: str
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Vm:
        return cls(data["id"], data["state"], data["template"], data["url"], data)


@dataclass(frozen=True)
class VmMetrics:
    """What a VM uses now (GET /v1/vms/{id}/metrics); CPU and memory are 0 while it is suspended."""

    vm: str
    state: str
    at: float
    cpu_seconds: float
    cpu_percent: float  # since the VM's previous read (by anyone); 100 is one whole CPU
    memory_bytes: int
    memory_peak_bytes: int
    memory_limit_bytes: int  # -1: none
    disk_bytes: int  # allocated bytes of its overlay and RAM file
    net_rx_bytes: int  # its tap's counters, host side: rx is what the guest sent
    net_tx_bytes: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmMetrics:
        d = data
        return cls(
            d["vm"], d["state"], d["at"], d["cpu_seconds"], d["cpu_percent"], d["memory_bytes"],
            d["memory_peak_bytes"], d["memory_limit_bytes"], d["disk_bytes"], d["net_rx_bytes"], d["net_tx_bytes"], d,
        )  # fmt: skip


@dataclass(frozen=True)
class Token:
    token: str
    expires_at: float
    url: str


@dataclass(frozen=True)
class ExecEvent:
    """One step of a running command: output ("stdout"/"stderr" with data) or its end ("exit")."""

    kind: str
    data: bytes = b""
    exit_code: int | None = None
    signal: str | None = None


@dataclass(frozen=True)
class LifecycleEvent:
    """One lifecycle change from GET /v1/events: `seq` orders them across the installation."""

    seq: int
    type: str  # created, running, paused, suspended, restored, failed, terminated, moved, ...
    vm: str
    state: str | None
    reason: str | None
    time: str  # RFC 3339 UTC, milliseconds
    template: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LifecycleEvent:
        return cls(d["seq"], d["type"], d["vm"], d.get("state"), d.get("reason"), d["time"], d.get("template"), d)


EVENT_RECONNECTS = 5  # a followed stream that breaks is resumed from its last id this many times in a row at most


@dataclass(frozen=True)
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit_code: int
    signal: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class AsyncClient:
    """The control API over HTTPS (or HTTP), authenticated with the admin key."""

    def __init__(
        self,
        url: str = "https://127.0.0.1:8443",
        admin_key: str = "",
        *,
        control_host: str = "api.mvm.localhost",
        cafile: str | None = None,
        timeout: float = 300.0,
        unix_socket: str | None = None,
    ) -> None:
        """`unix_socket`: reach the control API on this socket instead (`url` then only names it)."""
        self.url = url.rstrip("/")
        self._unix_socket = unix_socket
        self.control_host = control_host
        self._headers = {"Host": control_host, "Authorization": f"Bearer {admin_key}"}
        secure = url.startswith("https")
        self._ssl: ssl.SSLContext | bool = ssl.create_default_context(cafile=cafile) if secure else False
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- VMs

    async def create(
        self, template: str | None = None, policy: dict[str, Any] | None = None, run_payload: Any = None
    ) -> Vm:
        """Launch a VM from a template; `run_payload` (JSON) goes to the image's run hook."""
        body: dict[str, Any] = {}
        if run_payload is not None:
            body["run_payload"] = run_payload
        if template is not None:
            body["template"] = template
        if policy is not None:
            body["policy"] = policy
        return Vm.from_json(await self._json("POST", "/v1/vms", body))

    async def get(self, vm_id: str) -> Vm:
        return Vm.from_json(await self._json("GET", f"/v1/vms/{vm_id}"))

    async def list(self) -> builtins.list[Vm]:
        """Every VM, oldest first: the pages of GET /v1/vms one after another."""
        vms: builtins.list[Vm] = []
        cursor: str | None = None
        while True:
            page, cursor = await self.list_page(cursor=cursor)
            vms.extend(page)
            if cursor is None:
                return vms

    async def list_page(
        self, limit: int | None = None, cursor: str | None = None
    ) -> tuple[builtins.list[Vm], str | None]:
        """One page of VMs (at most `limit`, else the server's list_page_size) and the cursor of the next."""
        query = {k: str(v) for k, v in (("limit", limit), ("cursor", cursor)) if v is not None}
        async with self.request("GET", "/v1/vms", params=query) as resp:
            data = orjson.loads(await resp.read())
        return [Vm.from_json(vm) for vm in data["vms"]], data.get("next")

    async def token(
        self, vm_id: str, ttl: float | None = None, scopes: builtins.list[str] | None = None, ports: str | None = None
    ) -> Token:
        """A token for the VM's host name: scopes http (the app), exec, files (/.mvm/ paths); ports "all" or a range."""
        body: dict[str, Any] = {} if ttl is None else {"ttl": ttl}
        if scopes is not None:
            body["scopes"] = scopes
        if ports is not None:
            body["ports"] = ports
        data = await self._json("POST", f"/v1/vms/{vm_id}/tokens", body)
        return Token(data["token"], data["expires_at"], data["url"])

    async def suspend(self, vm_id: str) -> Vm:
        return Vm.from_json(await self._json("POST", f"/v1/vms/{vm_id}/suspend"))

    async def resume(self, vm_id: str) -> Vm:
        return Vm.from_json(await self._json("POST", f"/v1/vms/{vm_id}/resume"))

    async def delete(self, vm_id: str) -> None:
        await self._json("DELETE", f"/v1/vms/{vm_id}")

    async def fork(
        self, vm_id: str, count: int = 1, policy: dict[str, Any] | None = None, checkpoint: str | None = None
    ) -> builtins.list[Vm]:
        """`count` new VMs continuing from the VM's moment now, or from its checkpoint `checkpoint`."""
        body: dict[str, Any] = {"count": count}
        if policy is not None:
            body["policy"] = policy
        if checkpoint is not None:
            body["checkpoint"] = checkpoint
        data = await self._json("POST", f"/v1/vms/{vm_id}/fork", body)
        return [Vm.from_json(v) for v in data["vms"]]

    async def checkpoint(self, vm_id: str, name: str) -> dict[str, Any]:
        """Checkpoint `name` of the VM now: {"name", "bytes", "created_at", "paused_ms", ...}."""
        data: dict[str, Any] = await self._json("POST", f"/v1/vms/{vm_id}/checkpoints", {"name": name})
        return data

    async def checkpoints(self, vm_id: str) -> builtins.list[dict[str, Any]]:
        data = await self._json("GET", f"/v1/vms/{vm_id}/checkpoints")
        return list(data["checkpoints"])

    async def delete_checkpoint(self, vm_id: str, name: str) -> None:
        await self._json("DELETE", f"/v1/vms/{vm_id}/checkpoints/{name}")

    async def rewind(self, vm_id: str, checkpoint: str) -> Vm:
        """The same VM (id, URL, tokens) back at its checkpoint `checkpoint`."""
        return Vm.from_json(await self._json("POST", f"/v1/vms/{vm_id}/restore", {"checkpoint": checkpoint}))

    async def metrics(self, vm_id: str) -> VmMetrics:
        return VmMetrics.from_json(await self._json("GET", f"/v1/vms/{vm_id}/metrics"))

    # ---- lifecycle events

    async def events(
        self, vm: str | builtins.list[str] | None = None, types: str | builtins.list[str] | None = None,
        after: int | None = None, follow: bool = True,
    ) -> AsyncIterator[LifecycleEvent]:  # fmt: skip
        """The lifecycle events after seq `after` (default: every retained one), oldest first; with
        `follow` it then waits for new ones for ever, resuming after the last one it yielded when the
        stream breaks (Last-Event-ID), so none is missed; without, it ends after the retained ones."""
        params = {name: ",".join([value] if isinstance(value, str) else value)
                  for name, value in (("vm", vm), ("type", types)) if value}  # fmt: skip
        last = after or 0
        if not follow:
            async with self.request("GET", "/v1/events", params={**params, "follow": "0", "after": str(last)}) as resp:
                for item in orjson.loads(await resp.read())["events"]:
                    yield LifecycleEvent.from_json(item)
            return
        failures = 0
        while True:
            try:
                async with self.request("GET", "/v1/events", params={**params, "after": str(last)}, timeout=None) as r:
                    async for ev in _server_sent(r):
                        failures = 0
                        last = ev.seq
                        yield ev
            except (aiohttp.ClientError, ApiError) as exc:
                if (isinstance(exc, ApiError) and exc.status != 0) or failures >= EVENT_RECONNECTS:
                    raise
            if failures >= EVENT_RECONNECTS:
                raise ApiError(0, "unreachable", f"the event stream ended {failures + 1} times in a row")
            failures += 1
            await asyncio.sleep(min(0.5 * failures, 5.0))

    async def logs(self, vm_id: str, tail: int = 65536) -> bytes:
        """The last `tail` bytes of the VM's app output (stdout and stderr)."""
        async with self.request("GET", f"/v1/vms/{vm_id}/logs", params={"tail": str(tail)}) as resp:
            return await resp.read()

    # ---- exec

    async def exec(
        self,
        vm_id: str,
        argv: builtins.list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str = "/",
        user: str = "root",
        stdin: bytes = b"",
        timeout: float = 300.0,
    ) -> AsyncIterator[ExecEvent]:
        """Run a command; yields its output as it comes, then one "exit" event."""
        body = {"argv": argv, "env": env or {}, "cwd": cwd, "user": user, "timeout": timeout,
                "stdin_b64": base64.b64encode(stdin).decode()}  # fmt: skip
        async with self.request("POST", f"/v1/vms/{vm_id}/exec", orjson.dumps(body), timeout=None) as resp:
            async for line in resp.content:
                event = orjson.loads(line)
                if "stream" in event:
                    yield ExecEvent(event["stream"], base64.b64decode(event["data"]))
                elif "exit_code" in event:
                    yield ExecEvent("exit", exit_code=event["exit_code"], signal=event.get("signal"))
                    return
                else:
                    code = "timed_out" if event.get("timed_out") else "exec_failed"
                    raise ExecFailed(200, code, event.get("error", "the exec ended without an exit code"))
        raise ExecFailed(200, "exec_failed", "the exec stream ended without an exit code")

    async def run(self, vm_id: str, argv: builtins.list[str], **options: Any) -> ExecResult:
        """Run a command to its end: stdout, stderr, exit code (and the signal that killed it, if one did)."""
        out, err = bytearray(), bytearray()
        async for event in self.exec(vm_id, argv, **options):
            if event.kind == "stdout":
                out += event.data
            elif event.kind == "stderr":
                err += event.data
            else:
                assert event.exit_code is not None
                return ExecResult(bytes(out), bytes(err), event.exit_code, event.signal)
        raise ExecFailed(200, "exec_failed", "the exec stream ended without an exit code")

    # ---- files

    async def read_file(self, vm_id: str, path: str) -> bytes:
        async with self.request("GET", f"/v1/vms/{vm_id}/files", params={"path": path}) as resp:
            if resp.content_type == "application/json":
                raise ApiError(409, "is_a_directory", f"{path} is a directory: use list_files")
            return await resp.read()

    async def write_file(self, vm_id: str, path: str, data: bytes) -> int:
        """Write atomically (the guest writes a temporary file and renames it); returns the size."""
        async with self.request("PUT", f"/v1/vms/{vm_id}/files", data, params={"path": path}) as resp:
            return int((await resp.json())["bytes"])

    async def list_files(self, vm_id: str, path: str) -> builtins.list[dict[str, Any]]:
        """A directory's entries: name, type, size, mode, mtime."""
        async with self.request("GET", f"/v1/vms/{vm_id}/files", params={"path": path}) as resp:
            if resp.content_type != "application/json":
                raise ApiError(409, "not_a_directory", f"{path} is a file: use read_file")
            entries: builtins.list[dict[str, Any]] = (await resp.json())["entries"]
            return entries

    async def delete_file(self, vm_id: str, path: str) -> None:
        async with self.request("DELETE", f"/v1/vms/{vm_id}/files", params={"path": path}):
            pass

    # ---- transport

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        data = orjson.dumps(body) if body is not None else None
        async with self.request(method, path, data) as resp:
            raw = await resp.read()
        return orjson.loads(raw) if raw else None

    def request(
        self, method: str, path: str, data: Any = None, *, params: dict[str, str] | None = None,
        timeout: float | None = -1.0,
    ) -> _Call:  # fmt: skip
        """Any control API call, as `async with client.request(...) as resp`: an error answer raises
        its typed ApiError (status 0: the server could not be reached). `timeout` None: no limit."""
        total = self._timeout if timeout == -1.0 else timeout
        return _Call(self, method, path, data, params, aiohttp.ClientTimeout(total=total))

    @contextlib.asynccontextmanager
    async def websocket(self, path: str) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
        """A WebSocket to the control API (the shell); a refused handshake raises its typed ApiError."""
        try:
            async with self.session().ws_connect(
                self.url + path, headers=self._headers, ssl=self._ssl,
                server_hostname=self.control_host if self._ssl else None,
            ) as ws:  # fmt: skip
                yield ws
        except aiohttp.WSServerHandshakeError as exc:
            raise error_for(exc.status, "handshake_refused", exc.message) from None
        except aiohttp.ClientError as exc:
            raise ApiError(0, "unreachable", f"cannot reach {urlsplit(self.url).netloc}: {exc}") from exc

    def session(self) -> aiohttp.ClientSession:
        """The one HTTP session every call of this client shares (made on first use)."""
        if self._session is None:
            connector = aiohttp.UnixConnector(self._unix_socket) if self._unix_socket else None
            self._session = aiohttp.ClientSession(connector=connector, read_bufsize=1 << 21)
        return self._session


async def _server_sent(resp: aiohttp.ClientResponse) -> AsyncIterator[LifecycleEvent]:
    """The events of a text/event-stream answer; comments (keepalives) are skipped."""
    data: builtins.list[bytes] = []
    async for line in resp.content:
        line = line.rstrip(b"\r\n")
        if not line:
            if data:
                yield LifecycleEvent.from_json(orjson.loads(b"\n".join(data)))
            data = []
        elif line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" "))


class _Call:
    """One request as an async context manager; an error answer raises its typed ApiError."""

    def __init__(self, client: AsyncClient, method: str, path: str, data: Any, params: Any, timeout: Any) -> None:
        self.client, self.method, self.path = client, method, path
        self.data, self.params, self.timeout = data, params, timeout
        self.resp: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        c = self.client
        try:
            self.resp = await c.session().request(
                self.method, c.url + self.path, data=self.data, params=self.params, headers=c._headers,
                ssl=c._ssl, server_hostname=c.control_host if c._ssl else None, timeout=self.timeout,
            )  # fmt: skip
        except aiohttp.ClientError as exc:
            raise ApiError(0, "unreachable", f"cannot reach {urlsplit(c.url).netloc}: {exc}") from exc
        if self.resp.status >= 400:
            raw = await self.resp.read()
            self.resp.release()
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                doc = {}
            doc = doc if isinstance(doc, dict) else {}
            message = doc.get("message", raw.decode(errors="replace"))
            raise error_for(self.resp.status, doc.get("error", "error"), message)
        return self.resp

    async def __aexit__(self, *_: object) -> None:
        if self.resp is not None:
            self.resp.release()


class Client:
    """The blocking SDK: AsyncClient's calls on a private event loop thread."""

    def __init__(self, url: str = "https://127.0.0.1:8443", admin_key: str = "", **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="microvm-edge-sdk", daemon=True)
        self._thread.start()
        self._async = AsyncClient(url, admin_key, **options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._call(self._async.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        return asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), self._loop).result()  # type: ignore[arg-type]

    def create(self, template: str | None = None, policy: dict[str, Any] | None = None, run_payload: Any = None) -> Vm:
        return self._call(self._async.create, template, policy, run_payload)

    def get(self, vm_id: str) -> Vm:
        return self._call(self._async.get, vm_id)

    def list(self) -> builtins.list[Vm]:
        return self._call(self._async.list)

    def list_page(self, limit: int | None = None, cursor: str | None = None) -> tuple[builtins.list[Vm], str | None]:
        return self._call(self._async.list_page, limit, cursor)

    def token(
        self, vm_id: str, ttl: float | None = None, scopes: builtins.list[str] | None = None, ports: str | None = None
    ) -> Token:
        return self._call(self._async.token, vm_id, ttl, scopes, ports)

    def suspend(self, vm_id: str) -> Vm:
        return self._call(self._async.suspend, vm_id)

    def resume(self, vm_id: str) -> Vm:
        return self._call(self._async.resume, vm_id)

    def delete(self, vm_id: str) -> None:
        self._call(self._async.delete, vm_id)

    def fork(
        self, vm_id: str, count: int = 1, policy: dict[str, Any] | None = None, checkpoint: str | None = None
    ) -> builtins.list[Vm]:
        return self._call(self._async.fork, vm_id, count, policy, checkpoint)

    def checkpoint(self, vm_id: str, name: str) -> dict[str, Any]:
        return self._call(self._async.checkpoint, vm_id, name)

    def checkpoints(self, vm_id: str) -> builtins.list[dict[str, Any]]:
        return self._call(self._async.checkpoints, vm_id)

    def delete_checkpoint(self, vm_id: str, name: str) -> None:
        self._call(self._async.delete_checkpoint, vm_id, name)

    def rewind(self, vm_id: str, checkpoint: str) -> Vm:
        return self._call(self._async.rewind, vm_id, checkpoint)

    def metrics(self, vm_id: str) -> VmMetrics:
        return self._call(self._async.metrics, vm_id)

    def logs(self, vm_id: str, tail: int = 65536) -> bytes:
        return self._call(self._async.logs, vm_id, tail)

    def exec(self, vm_id: str, argv: builtins.list[str], **options: Any) -> Iterator[ExecEvent]:
        """A blocking iterator over the command's events, as they come."""
        return self._blocking(self._async.exec(vm_id, argv, **options))

    def run(self, vm_id: str, argv: builtins.list[str], **options: Any) -> ExecResult:
        return self._call(self._async.run, vm_id, argv, **options)

    def events(self, **options: Any) -> Iterator[LifecycleEvent]:
        """A blocking iterator over the lifecycle events (AsyncClient.events' options)."""
        return self._blocking(self._async.events(**options))

    def _blocking(self, items: AsyncIterator[T]) -> Iterator[T]:
        """An async generator of the client's loop as a blocking iterator; closed when it is."""
        try:
            while True:
                try:
                    yield self._call(items.__anext__)
                except StopAsyncIteration:
                    return
        finally:
            self._call(items.aclose)  # type: ignore[attr-defined]

    def read_file(self, vm_id: str, path: str) -> bytes:
        return self._call(self._async.read_file, vm_id, path)

    def write_file(self, vm_id: str, path: str, data: bytes) -> int:
        return self._call(self._async.write_file, vm_id, path, data)

    def list_files(self, vm_id: str, path: str) -> builtins.list[dict[str, Any]]:
        return self._call(self._async.list_files, vm_id, path)

    def delete_file(self, vm_id: str, path: str) -> None:
        self._call(self._async.delete_file, vm_id, path)
