"""Fleet roles as real processes on this machine: `mvm host`, `mvm edge` and `mvm serve --workers`.

Each process gets its own TOML file and stderr log (JSON lines, so a test can count events
such as restores); every role listens on 127.0.0.1 only, on ports picked free.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import orjson

from tests.e2e.conftest import REPO
from tests.e2e.guest import dechunk

ADMIN = "dev-admin-key-change-me"
DOMAIN = "mvm.localhost"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    """JSON spells strings, numbers and booleans as TOML does; tables and lists of them are TOML's own."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return orjson.dumps(value).decode()


class Role:
    """One `mvm` process: started, killed, restarted with the same config; its log kept in a file."""

    def __init__(self, name: str, args: list[str], config: Path, log: Path) -> None:
        self.name, self.args, self.config, self.log = name, args, config, log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mvm.cli", *self.args, "--config", str(self.config), cwd=REPO,
                stdout=asyncio.subprocess.DEVNULL, stderr=log,
            )  # fmt: skip

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(sig)
        try:
            await asyncio.wait_for(self.proc.wait(), 60)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def events(self, name: str, vm: str) -> int:
        """How many `name` events for VM `vm` this role has logged."""
        count = 0
        for line in self.log.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                event = orjson.loads(line)
                if isinstance(event, dict) and event.get("event") == name and event.get("vm") == vm:
                    count += 1
        return count


class EdgeClient:
    """HTTP/1.1 over raw sockets to an edge's port: the control API and VM hosts by name."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def request(
        self, host: str, method: str, path: str, headers: str = "", body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
            writer.write(f"{head}{headers}\r\n".encode() + body)
            raw = await asyncio.wait_for(reader.read(), 60)
        finally:
            writer.close()
        head_bytes, _, payload = raw.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        if fields.get("Transfer-Encoding") == "chunked":
            payload = dechunk(payload)
        return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, payload

    async def api(self, method: str, path: str, body: Any = None, status: int | None = None) -> Any:
        data = orjson.dumps(body) if body is not None else b""
        got, _, payload = await self.request(f"api.{DOMAIN}", method, path, f"Authorization: Bearer {ADMIN}\r\n", data)
        answer = orjson.loads(payload) if payload else None
        if status is not None:
            assert got == status, (got, answer)
        return answer

    async def vm_get(self, vm_id: str, token: str, path: str = "/") -> tuple[int, dict[str, str], bytes]:
        return await self.request(f"{vm_id}.{DOMAIN}", "GET", path, f"Authorization: Bearer {token}\r\n")

    async def counter(self, vm_id: str, token: str) -> int:
        status, _, body = await self.vm_get(vm_id, token)
        assert status == 200, body
        return int(orjson.loads(body)["counter"])

    async def until_up(self, timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    if (await self.request(f"api.{DOMAIN}", "GET", "/healthz"))[0] == 200:
                        return
                await asyncio.sleep(0.1)


class ServedRole(EdgeClient):
    """A running `mvm` role (its Role: process and JSON log) and a client of the port it serves."""

    def __init__(self, role: Role, port: int) -> None:
        super().__init__(port)
        self.role = role

    @property
    def proc(self) -> asyncio.subprocess.Process:
        assert self.role.proc is not None
        return self.role.proc
