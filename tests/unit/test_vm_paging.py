"""Listing many VMs: GET /v1/vms in pages (stable order, a cursor that survives deletes), the SDK and
`mvm vm ls` paging through all of them, over a registry of a few hundred suspended VMs (no QEMU)."""

from __future__ import annotations

import argparse
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from edge.control import build_control_app
from edge.metrics import Metrics
from edge.paging import PageRequest, page, page_request
from edge.settings import token_service
from microvm_edge import AsyncClient
from microvm_edge.errors import ApiError
from mvm import cli
from mvm.config import load_config
from tests.unit.fake_runtime import FakeRuntime
from vmm.errors import InvalidRequest
from vmm.manager import VmManager
from vmm.model import VmRecord, VmState
from vmm.policy import Policy
from vmm.registry import Registry
from vmm.settings import VmmSettings

COUNT = 350


def _suspended(i: int) -> VmRecord:
    at = 1_700_000_000.0 + i // 3  # three VMs share each creation time: the id orders them
    return VmRecord(f"v{i:011d}", "demo", VmState.SUSPENDED, Policy(), 8080, at, at, state_changed_at=at)


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[tuple[VmManager, AsyncClient]]:
    settings = VmmSettings(state_dir=tmp_path, memory_reserve_mb=0, guest_sync=False)
    registry = Registry(settings.registry_path)
    for i in reversed(range(COUNT)):  # written newest first: the order shown is the records', not the rows'
        registry.save(_suspended(i))
    registry.close()
    manager = VmManager(settings, runtime=FakeRuntime(settings))
    await manager.start()
    cfg = load_config(None)
    server = replace(cfg.server, list_page_size=100)
    runner = web.AppRunner(build_control_app(server, manager, token_service(cfg.tokens), Metrics()))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    client = AsyncClient(f"http://127.0.0.1:{runner.addresses[0][1]}", server.admin_key)
    try:
        yield manager, client
    finally:
        await client.close()
        await runner.cleanup()
        await manager.close()


async def test_the_sdk_pages_through_every_suspended_vm_in_creation_order(control: Any) -> None:
    manager, client = control
    assert len(manager.list_vms()) == COUNT
    first, cursor = await client.list_page()
    assert len(first) == 100 and cursor is not None  # the server's list_page_size
    everything = await client.list()
    assert [vm.id for vm in everything] == [f"v{i:011d}" for i in range(COUNT)]
    assert all(vm.state == "suspended" for vm in everything)


async def test_a_vm_deleted_between_two_pages_moves_no_other_one(control: Any) -> None:
    manager, client = control
    first, cursor = await client.list_page(limit=120)
    await manager.delete(first[-1].id)  # the VM the cursor names
    await manager.delete(first[0].id)
    second, _ = await client.list_page(limit=120, cursor=cursor)
    assert second[0].id == f"v{120:011d}"
    rest: list[str] = []
    while cursor is not None:
        chunk, cursor = await client.list_page(limit=77, cursor=cursor)
        rest.extend(vm.id for vm in chunk)
    assert rest == [f"v{i:011d}" for i in range(120, COUNT)]


async def test_a_bad_limit_or_cursor_is_a_422_naming_it(control: Any) -> None:
    _, client = control
    with pytest.raises(ApiError, match="limit='0'"):
        await client.list_page(limit=0)
    with pytest.raises(ApiError, match="cursor='nonsense'"):
        await client.list_page(cursor="nonsense")


def test_page_request_reads_limit_and_cursor() -> None:
    assert page_request({}, 50) == PageRequest(50, None)
    assert page_request({"limit": "7", "cursor": "12.5_vabc"}, 50) == PageRequest(7, (12.5, "vabc"))
    with pytest.raises(InvalidRequest):
        page_request({"limit": "1001"}, 50)
    recs = [_suspended(i) for i in range(5)]
    assert page(recs, PageRequest(5, None)) == (recs, None)


def test_vm_ls_prints_every_page(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    recs = [_suspended(i) for i in range(25)]
    asked: list[str] = []

    def api(_: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
        asked.append(path)
        query = dict(urllib.parse.parse_qsl(path.partition("?")[2]))
        vms, after = page(recs, page_request(query, 10))
        return {"vms": [{**r.to_dict(), "url": f"http://{r.id}"} for r in vms], "next": after}

    monkeypatch.setattr(cli, "_api", api)
    cli._vm_ls(argparse.Namespace())
    lines = capsys.readouterr().out.splitlines()
    assert len(asked) == 3 and [line.split()[0] for line in lines[1:]] == [r.id for r in recs]
