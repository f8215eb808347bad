"""The lifecycle event feed: which move is which event, the ring, the registry, and GET /v1/events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from edge.control import build_control_app
from edge.metrics import Metrics
from edge.settings import token_service
from mvm.config import load_config
from vmm.events import Event, EventRing, EventsSettings, event_type
from vmm.lifecycle import Lifecycle
from vmm.model import VmRecord, VmState
from vmm.policy import Policy
from vmm.records import RecordStore
from vmm.settings import VmmSettings

_S = VmState


def _ev(seq: int, kind: str = "running", vm: str = "vaaaaaaaaaaa", at: float | None = None) -> Event:
    return Event(seq, kind, vm, "running", None, time.time() if at is None else at, "demo")


def test_each_move_is_the_event_of_the_state_it_reaches_and_transitional_states_are_none() -> None:
    assert event_type(_S.PENDING, _S.RUNNING) == "running"
    assert event_type(_S.RESTORING, _S.RUNNING) == "restored"
    assert event_type(_S.SUSPENDING, _S.SUSPENDED) == "suspended"
    assert event_type(_S.RESTORING, _S.SUSPENDED) == "suspended"  # a failed restore, with its reason
    assert event_type(_S.RUNNING, _S.PAUSED) == "paused"
    assert event_type(_S.RUNNING, _S.FAILED) == "failed"
    assert event_type(_S.TERMINATING, _S.TERMINATED) == "terminated"
    for transitional in (_S.SUSPENDING, _S.RESTORING, _S.TERMINATING):
        assert event_type(_S.RUNNING, transitional) is None
    assert event_type(_S.RUNNING, _S.RUNNING) is None


def test_an_event_round_trips_through_its_json_with_rfc3339_milliseconds() -> None:
    ev = Event(7, "suspended", "vaaaaaaaaaaa", "suspended", "idle for 2s", 1700000000.25, "demo", {"host": "h1"})
    data = ev.to_dict()
    assert data["time"] == "2023-11-14T22:13:20.250Z" and data["host"] == "h1"
    assert Event.from_json(9, ev.to_json()) == ev.renumbered(9)


def test_the_ring_filters_keeps_its_bound_and_ignores_old_seqs() -> None:
    ring = EventRing(retain_count=3, retain_seconds=3600)
    ring.add([_ev(1), _ev(2, "paused"), _ev(3, vm="vbbbbbbbbbbb"), _ev(4), _ev(2)])
    assert [e.seq for e in ring.after(0)] == [2, 3, 4] and ring.last_seq == 4
    assert [e.seq for e in ring.after(2)] == [3, 4]
    assert [e.seq for e in ring.after(0, vms={"vbbbbbbbbbbb"})] == [3]
    assert [e.seq for e in ring.after(0, types={"paused"})] == [2]
    old = EventRing(retain_count=10, retain_seconds=60)
    old.add([_ev(1, at=time.time() - 120), _ev(2, at=time.time() - 90), _ev(3)])
    assert [e.seq for e in old.after(0)] == [3]


async def test_wait_returns_when_a_newer_event_arrives_and_times_out_without_one() -> None:
    ring = EventRing(10, 3600)
    assert not await ring.wait(0, 0.01)
    waiter = asyncio.create_task(ring.wait(0, 5))
    await asyncio.sleep(0)
    ring.add([_ev(1)])
    assert await waiter
    assert await ring.wait(0, 0.01)


def _rec(vm_id: str = "vaaaaaaaaaaa") -> VmRecord:
    return VmRecord(vm_id, "demo", _S.PENDING, Policy(), 8080, 1.0, 1.0)


def test_lifecycle_moves_become_numbered_events_that_outlive_a_restart(tmp_path: Path) -> None:
    settings = VmmSettings(state_dir=tmp_path)
    store = RecordStore(settings)
    store.open()
    lifecycle, rec = Lifecycle(store), _rec()
    store.write(rec)
    store.emit("created", rec)
    lifecycle.move_if_stored(rec, _S.RUNNING)
    lifecycle.move_if_stored(rec, _S.SUSPENDING)
    lifecycle.record_outcome(rec, _S.SUSPENDED, reason="idle")
    lifecycle.move_if_stored(rec, _S.RESTORING)
    lifecycle.move_if_stored(rec, _S.RUNNING)
    events = store.events.after(0)
    assert [(e.seq, e.type, e.state) for e in events] == [
        (1, "created", "pending"), (2, "running", "running"), (3, "suspended", "suspended"),
        (4, "restored", "running"),
    ]  # fmt: skip
    assert events[2].reason == "idle"
    store.close()
    again = RecordStore(settings)
    again.open()
    assert [e.to_dict() for e in again.events.after(0)] == [e.to_dict() for e in events]
    assert again.emit("terminated", rec).seq == 5
    again.close()


def test_the_registry_keeps_a_bounded_count_of_events(tmp_path: Path) -> None:
    settings = VmmSettings(state_dir=tmp_path, events=EventsSettings(retain_count=3))
    store = RecordStore(settings)
    store.open()
    for _ in range(5):
        store.emit("running", _rec())
    store.flush()
    store.close()
    again = RecordStore(VmmSettings(state_dir=tmp_path))
    again.open()
    assert [e.seq for e in again.events.after(0)] == [3, 4, 5]
    again.close()


class _NoVms:
    def list_vms(self) -> list[Any]:
        return []


@pytest.fixture
async def control() -> AsyncIterator[tuple[str, dict[str, str], EventRing]]:
    cfg = load_config(None)
    ring = EventRing(100, 3600)
    app = build_control_app(cfg.server, _NoVms(), token_service(cfg.tokens), Metrics(), ring, 0.2)  # type: ignore[arg-type]
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", {"Authorization": f"Bearer {cfg.server.admin_key}"}, ring
    await runner.cleanup()


async def _read_events(response: aiohttp.ClientResponse, count: int) -> list[tuple[str, dict[str, Any]]]:
    """(id, data) of the next `count` events; keepalive comments are skipped."""
    got: list[tuple[str, dict[str, Any]]] = []
    fields: dict[str, str] = {}
    while len(got) < count:
        line = (await asyncio.wait_for(response.content.readline(), 5)).decode().rstrip("\n")
        if line == "" and fields:
            got.append((fields["id"], orjson.loads(fields["data"])))
            fields = {}
        elif line and not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value
    return got


async def test_the_stream_serves_the_backlog_then_new_events_and_resumes_after_last_event_id(
    control: tuple[str, dict[str, str], EventRing],
) -> None:
    url, auth, ring = control
    ring.add([_ev(1, "created"), _ev(2, "running"), _ev(3, "running", vm="vbbbbbbbbbbb")])
    async with aiohttp.ClientSession(headers=auth) as http:
        async with http.get(f"{url}/v1/events?vm=vaaaaaaaaaaa") as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert [(i, d["type"]) for i, d in await _read_events(resp, 2)] == [("1", "created"), ("2", "running")]
            ring.add([_ev(4, "suspended"), _ev(5, "suspended", vm="vbbbbbbbbbbb")])
            assert [(i, d["seq"]) for i, d in await _read_events(resp, 1)] == [("4", 4)]
            assert b": keepalive" in await asyncio.wait_for(resp.content.readline(), 5)
        async with http.get(f"{url}/v1/events", headers={"Last-Event-ID": "3"}) as resp:
            assert [i for i, _ in await _read_events(resp, 2)] == ["4", "5"]
        async with http.get(f"{url}/v1/events?follow=0&type=running,suspended&after=2") as resp:
            assert [e["seq"] for e in (await resp.json())["events"]] == [3, 4, 5]
        async with http.get(f"{url}/v1/events?type=rebooted") as resp:
            assert resp.status == 422 and "unknown event type 'rebooted'" in (await resp.json())["message"]
        async with http.get(f"{url}/v1/events", headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
