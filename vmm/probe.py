"""Readiness probe: an HTTP request (or a bare TCP connect) to the guest from inside its namespace."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .errors import VmmError
from .image import Readiness
from .network import netns


async def http_request(
    vm_id: str, port: int, path: str, timeout: float, method: str = "GET", body: bytes | None = None
) -> tuple[int, bytes, bytes]:
    """One request with Connection: close (a JSON body if given); returns status, raw head and raw body.

    Raises OSError/TimeoutError when the guest cannot be reached.
    """
    sock = await netns.connect_guest(vm_id, port, timeout)
    request = f"{method} {path} HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n"
    if body is not None:
        request += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(request.encode() + b"\r\n" + (body or b""))
            raw = await reader.read()
        finally:
            writer.close()
    head, _, answer = raw.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
    return status, head, answer


async def _answers(vm_id: str, ready: Readiness) -> str | None:
    """None when the app is ready, else what it did instead (for the timeout message)."""
    if ready.kind == "tcp":
        sock = await netns.connect_guest(vm_id, ready.port, 2.0)
        sock.close()
        return None
    code, _, _ = await http_request(vm_id, ready.port, ready.path, 2.0, ready.method)
    return None if code == ready.expect_status else f"HTTP {code}"


async def wait_ready(vm_id: str, ready: Readiness, timeout: float, alive: Callable[[], bool]) -> None:
    """Poll until the app is ready as the image says; stop early when QEMU died."""
    last = "no answer"
    try:
        async with asyncio.timeout(timeout):
            while True:
                if not alive():
                    raise VmmError(f"QEMU exited while waiting for {ready.describe()} ({last})")
                try:
                    outcome = await _answers(vm_id, ready)
                    if outcome is None:
                        return
                    last = outcome
                except (OSError, TimeoutError) as exc:
                    last = type(exc).__name__
                await asyncio.sleep(0.05)
    except TimeoutError as exc:
        raise VmmError(f"the app was not ready within {timeout:.0f} s: waited for {ready.describe()} ({last})") from exc
