"""The control API answers JSON whatever goes wrong, and never lets a bad header crash it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from edge.control import build_control_app
from edge.metrics import Metrics
from edge.settings import token_service
from mvm.config import load_config


class BrokenManager:
    def list_vms(self) -> list[Any]:
        raise RuntimeError("registry unreadable")

    def templates(self) -> list[Any]:
        return []


@pytest.fixture
async def control() -> AsyncIterator[tuple[int, str]]:
    cfg = load_config(None)
    app = build_control_app(cfg.server, BrokenManager(), token_service(cfg.tokens), Metrics())  # type: ignore[arg-type]
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield port, cfg.server.admin_key
    await runner.cleanup()


async def _raw(port: int, head: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


async def test_unexpected_error_is_a_json_500(control: tuple[int, str]) -> None:
    port, key = control
    status, body = await _raw(
        port, f"GET /v1/vms HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n".encode()
    )
    assert status == 500
    assert b'"error":"internal_error"' in body and b"registry unreadable" in body


async def test_non_ascii_authorization_is_a_401_not_a_crash(control: tuple[int, str]) -> None:
    port, _ = control
    status, body = await _raw(
        port, b"GET /v1/vms HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n"
    )
    assert status == 401 and b'"error":"unauthorized"' in body


def test_control_and_proxy_share_one_error_table() -> None:
    """A 502 from the control API and from the proxy carry the same code."""
    from edge.control import error_response as control_error
    from edge.errors_http import error_code

    doc = orjson.loads(control_error(502, "qemu died").body)  # type: ignore[arg-type]
    assert doc == {"error": error_code(502), "message": "qemu died"} and doc["error"] == "bad_gateway"


async def _post(port: int, key: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    head = (f"POST {path} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    status, answer = await _raw(port, head + body)
    return status, orjson.loads(answer)


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/v1/vms/v1/fork", b"{}", 422, "count"),
        ("/v1/vms/v1/fork", b'{"count": 2, "colour": 1}', 422, "colour: unknown field"),
        ("/v1/vms/v1/restore", b"{}", 422, "checkpoint"),
        ("/v1/vms/v1/checkpoints", b'{"nam": "a"}', 422, "nam: unknown field"),
        ("/v1/vms", b'{"from_checkpoint": "v1"}', 422, "from_checkpoint must be"),
        ("/v1/vms/v1/fork", b'{"count": 2}', 501, "host API"),  # a VM plane without forks
    ],
)
async def test_fork_and_checkpoint_input_is_refused_naming_the_problem(
    control: tuple[int, str], path: str, body: bytes, status: int, says: str
) -> None:
    port, key = control
    got, answer = await _post(port, key, path, body)
    assert got == status and says in answer["message"], answer
