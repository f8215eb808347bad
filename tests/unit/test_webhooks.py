"""Webhooks: signed POSTs in order, retried with backoff, a bounded queue; and the fleet's event feed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from edge.metrics import Metrics
from edge.webhooks import SIGNATURE_HEADER, Webhooks, signature, verify
from fleet.catalog import open_catalog
from fleet.event_feed import CatalogEvents, EventForwarder
from vmm.events import Event, EventRing, EventsSettings, Webhook

SECRET = "whsec-0123456789abcdef"


def _ev(seq: int, kind: str = "running") -> Event:
    return Event(seq, kind, "vaaaaaaaaaaa", "running", None, time.time(), "demo")


class Receiver:
    """A local webhook receiver that answers each POST with the next status of `answers` (then 200)."""

    def __init__(self) -> None:
        self.answers: list[int] = []
        self.got: list[tuple[str, bool]] = []  # (X-Mvm-Event-Id, signature valid) of every POST
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.got.append((request.headers["X-Mvm-Event-Id"], verify(SECRET, body, request.headers[SIGNATURE_HEADER])))
        self.arrived.set()
        return web.Response(status=self.answers.pop(0) if self.answers else 200)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield rec, f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    await runner.cleanup()


async def _until(condition: object, what: str) -> None:
    deadline = time.monotonic() + 5
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_the_signature_covers_time_and_body_and_a_receiver_checks_both() -> None:
    header = signature(SECRET, b'{"seq":1}', int(time.time()))
    assert verify(SECRET, b'{"seq":1}', header)
    assert not verify(SECRET, b'{"seq":2}', header)
    assert not verify("another-secret-0123", b'{"seq":1}', header)
    assert not verify(SECRET, b'{"seq":1}', signature(SECRET, b'{"seq":1}', int(time.time()) - 3600))


async def test_every_event_arrives_signed_in_order_and_a_500_is_retried(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    rec.answers = [500]
    settings = EventsSettings(webhooks=(Webhook(url, SECRET),), webhook_backoff=0.01)
    metrics = Metrics()
    hooks = Webhooks(settings, metrics)
    hooks.start()
    try:
        for seq in (1, 2, 3):
            hooks.offer(_ev(seq))
        await _until(lambda: len(rec.got) == 4, "four POSTs")
        assert rec.got == [("1", True), ("1", True), ("2", True), ("3", True)]
        body = metrics.render()[0].decode()
        assert 'mvm_webhook_events_total{result="delivered"} 3.0' in body
        assert 'mvm_webhook_events_total{result="retried"} 1.0' in body
    finally:
        await hooks.stop()


async def test_types_filter_and_a_full_queue_drops_its_oldest_without_waiting() -> None:
    dead = "http://127.0.0.1:9/hook"  # discard port: nothing listens
    settings = EventsSettings(
        webhooks=(Webhook(dead, SECRET, frozenset({"suspended"})),), webhook_queue=2, webhook_attempts=1
    )
    metrics = Metrics()
    hooks = Webhooks(settings, metrics)  # not started: nothing drains the queue
    began = time.monotonic()
    for seq in range(1, 6):
        hooks.offer(_ev(seq, "suspended"))
    hooks.offer(_ev(6, "running"))
    assert time.monotonic() - began < 0.1
    sender = hooks.senders[0]
    assert [e.seq for e in sender.queue] == [4, 5] and sender.dropped == 3
    assert 'mvm_webhook_events_total{result="dropped"} 3.0' in metrics.render()[0].decode()


async def test_a_dead_webhook_is_given_up_after_its_attempts() -> None:
    settings = EventsSettings(
        webhooks=(Webhook("http://127.0.0.1:9/hook", SECRET),), webhook_attempts=2, webhook_backoff=0.01
    )
    metrics = Metrics()
    hooks = Webhooks(settings, metrics)
    hooks.start()
    try:
        hooks.offer(_ev(1))
        await _until(lambda: 'result="failed"} 1.0' in metrics.render()[0].decode(), "the event given up")
    finally:
        await hooks.stop()


async def test_hosts_events_reach_every_edge_in_one_sequence(tmp_path: Path) -> None:
    settings = EventsSettings()
    catalogs = [await open_catalog(None, tmp_path / "catalog.sqlite3") for _ in range(3)]
    try:
        locals_ = [EventRing(100, 3600), EventRing(100, 3600)]
        forwarders = [EventForwarder(catalogs[i], f"h{i}", locals_[i], settings, 0.1) for i in range(2)]
        numbered: list[int] = []
        forwarders[0].listeners.append(lambda ev: numbered.append(ev.seq))
        for fw in forwarders:
            await fw.start()
        edges = [CatalogEvents(catalogs[2], settings), CatalogEvents(catalogs[0], settings)]
        for edge in edges:
            await edge.start()
        locals_[0].add([_ev(1, "created"), _ev(2)])
        locals_[1].add([_ev(1, "created")])
        locals_[0].add([_ev(3, "suspended")])
        await _until(lambda: all(e.ring.last_seq == 4 for e in edges), "four events at both edges")
        seen = [[(e.seq, e.type) for e in edge.ring.after(0)] for edge in edges]
        assert seen[0] == seen[1] and [s for s, _ in seen[0]] == [1, 2, 3, 4]
        assert len(numbered) == 3
        for fw in forwarders:
            await fw.stop()
        again = EventForwarder(catalogs[0], "h0", locals_[0], settings, 0.1)
        await again.start()  # resumes after what the catalog has: nothing is appended twice
        await again.stop()
        assert [e.seq for e in await catalogs[1].events_after(0, 100)] == [1, 2, 3, 4]
        for edge in edges:
            await edge.stop()
    finally:
        for cat in catalogs:
            await cat.close()
