"""Exec and files through the control API with a silent or stuck guest agent (fakes): the answer is a 4xx
naming the field for bad input, and a 504 naming the VM and the timeout when the agent does not answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from edge.control import build_control_app
from edge.metrics import Metrics
from edge.settings import token_service
from mvm.config import load_config
from vmm.agent import Exec


class _SilentAgent:
    """An agent that takes frames (or, stuck, never takes stdin) and never answers."""

    def __init__(self, stuck: bool) -> None:
        self.stuck, self.execs, self.sent = stuck, {}, []  # type: ignore[var-annotated]

    async def send(self, kind: int, channel: int, payload: bytes, drain: bool = True) -> None:
        self.sent.append(kind)
        if self.stuck and kind == 15:  # F_STDIN: the guest's side of the channel is full
            await asyncio.Event().wait()


class _Manager:
    def __init__(self, stuck: bool = False) -> None:
        self.agent = _SilentAgent(stuck)
        self.started: list[list[str]] = []

    async def exec(self, vm_id: str, argv: list[str], *args: Any, **kwargs: Any) -> Exec:
        self.started.append(argv)
        return Exec(self.agent, len(self.started))  # type: ignore[arg-type]

    @contextlib.contextmanager
    def busy(self, vm_id: str) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def _control(manager: _Manager) -> AsyncIterator[tuple[TestClient, dict[str, str]]]:
    cfg = load_config(None)
    app = build_control_app(cfg.server, manager, token_service(cfg.tokens), Metrics())  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        yield client, {"Authorization": f"Bearer {cfg.server.admin_key}"}


async def _answer(resp: Any) -> tuple[int, str]:
    return resp.status, (await resp.json())["message"]


@pytest.mark.parametrize(
    ("method", "query", "data"),
    [("GET", "", None), ("DELETE", "", None), ("PUT", "", b"hello")],
)
async def test_a_silent_agent_gets_a_504_naming_the_vm_and_the_timeout(method: str, query: str, data: Any) -> None:
    manager = _Manager()
    async with _control(manager) as (client, auth):
        resp = await client.request(method, "/v1/vms/vabc/files", params={"path": "/data/x", "timeout": "0.2"},
                                    data=data, headers=auth)  # fmt: skip
        assert await _answer(resp) == (504, "VM vabc: the guest agent did not answer within the timeout of 0.2 s")
        assert manager.agent.sent[-1] == 16  # F_KILL: the tool was abandoned


async def test_an_upload_the_agent_never_takes_gets_a_504() -> None:
    manager = _Manager(stuck=True)
    async with _control(manager) as (client, auth):
        resp = await client.put("/v1/vms/vabc/files", params={"path": "/data/x", "timeout": "0.2"},
                                data=b"x" * 200_000, headers=auth)  # fmt: skip
        assert await _answer(resp) == (504, "VM vabc: the guest agent did not answer within the timeout of 0.2 s")


@pytest.mark.parametrize("timeout", ["0", "-1", "3601", "soon", "nan"])
async def test_a_bad_files_timeout_is_a_422_naming_it(timeout: str) -> None:
    async with _control(_Manager()) as (client, auth):
        resp = await client.get("/v1/vms/vabc/files", params={"path": "/x", "timeout": timeout}, headers=auth)
        assert await _answer(resp) == (422, f"timeout must be a number of seconds in (0, 3600], got {timeout!r}")


@pytest.mark.parametrize("path", ["/", "//", "/.", "/data/..", "/../.."])
async def test_deleting_the_root_is_a_422_and_never_reaches_the_guest(path: str) -> None:
    manager = _Manager()
    async with _control(manager) as (client, auth):
        resp = await client.delete("/v1/vms/vabc/files", params={"path": path}, headers=auth)
        assert await _answer(resp) == (422, f"path: {path} is the root directory, which cannot be removed")
        assert manager.started == []


_TOO_BIG = "argv: argv, env and cwd take 1048584 bytes; at most 1048512 fit one exec"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"argv": ["id"], "user": 99999999999}, "user: uid and gid must be in 0..4294967294, got 99999999999"),
        ({"argv": ["id"], "user": "0:4294967295"}, "user: uid and gid must be in 0..4294967294, got '0:4294967295'"),
        ({"argv": ["id"], "user": "\u00b9"}, 'user must be "root", "<uid>" or "<uid>:<gid>", got \'\u00b9\''),
        ({"argv": ["echo", "x" * (1 << 20)]}, _TOO_BIG),  # echo\0 x..x\0 /\0
        ({"argv": ["id"], "env": {"A": "x" * (1 << 20)}}, _TOO_BIG),  # id\0 A=x..x\0 /\0
        ({"argv": ["id"], "cwd": "/\u0000"}, "cwd must be an absolute path"),
    ],
)
async def test_bad_exec_input_is_a_422_naming_the_field(body: dict[str, Any], message: str) -> None:
    manager = _Manager()
    async with _control(manager) as (client, auth):
        resp = await client.post("/v1/vms/vabc/exec", json=body, headers=auth)
        assert await _answer(resp) == (422, message)
        assert manager.started == []
