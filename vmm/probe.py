"""Readiness probe: an HTTP GET to the guest from inside its namespace."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from . import netns
from .errors import VmmError


async def http_get(vm_id: str, port: int, path: str, timeout: float) -> tuple[int, bytes, bytes]:
    """One GET with Connection: close; returns status, raw head and raw body.

    Raises OSError/TimeoutError when the guest cannot be reached.
    """
    sock = await netns.connect_guest(vm_id, port, timeout)
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n".encode())
            raw = await reader.read()
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
    return status, head, body


async def wait_ready(vm_id: str, port: int, path: str, timeout: float, alive: Callable[[], bool]) -> None:
    """Poll until the app answers 200; stop early when QEMU died."""
    last = "no answer"
    try:
        async with asyncio.timeout(timeout):
            while True:
                if not alive():
                    raise VmmError(f"QEMU exited while waiting for the app on port {port} ({last})")
                try:
                    code, _, _ = await http_get(vm_id, port, path, 2.0)
                    if code == 200:
                        return
                    last = f"HTTP {code}"
                except (OSError, TimeoutError) as exc:
                    last = type(exc).__name__
                await asyncio.sleep(0.05)
    except TimeoutError as exc:
        raise VmmError(f"app did not answer GET {path} on port {port} within {timeout:.0f} s ({last})") from exc
