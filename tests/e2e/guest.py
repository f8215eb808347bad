"""Helpers for end-to-end tests: talk HTTP to a guest from inside its namespace, find leftovers."""

from __future__ import annotations

import ast
import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from vmm import probe
from vmm.network import netns


def count_restores(manager: Any, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """The manager's restores from now on: call the result for how many so far."""
    restores = 0
    real_restore = manager.snapshots.restore

    async def counting_restore(vm: Any) -> None:
        nonlocal restores
        restores += 1
        await real_restore(vm)

    monkeypatch.setattr(manager.snapshots, "restore", counting_restore)
    return lambda: restores


async def guest_request(vm_id: str, path: str = "/", port: int = 8080, timeout: float = 20.0) -> tuple[int, bytes]:
    """One HTTP/1.1 GET to the guest from inside its namespace; returns status and body."""
    status, head, body = await probe.http_request(vm_id, port, path, timeout)
    if b"transfer-encoding: chunked" in head.lower():
        body = dechunk(body)
    return status, body


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


async def guest_state(vm_id: str, port: int = 8080) -> dict[str, Any]:
    """GET / on the demo app: counter (incremented), boot_id, uptime."""
    status, body = await guest_request(vm_id, "/", port)
    assert status == 200, body
    result: dict[str, Any] = orjson.loads(body)
    return result


def qemu_pids_under(root: Path) -> list[int]:
    """QEMU processes whose command line mentions `root` (what a test started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and str(root).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


async def sandbox_run(vm_id: str, code: str, timeout: float = 30.0) -> Any:
    """POST /run to the python-sandbox app from inside the VM's namespace; the value of its last expression."""
    sock = await netns.connect_guest(vm_id, 8080, timeout)
    body = orjson.dumps({"code": code})
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            head = f"POST /run HTTP/1.1\r\nHost: guest\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode() + body)
            raw = await reader.read()
        finally:
            writer.close()
    answer = orjson.loads(raw.partition(b"\r\n\r\n")[2])
    assert answer["error"] is None, answer["error"]
    return ast.literal_eval(answer["result"])
