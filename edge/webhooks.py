"""Lifecycle events POSTed to the [events] webhooks, signed, retried, off the wake path.

Each webhook has a bounded queue and one task that sends its events in order, one POST per
event. Recording an event only appends to the queues (no I/O, no await), so a webhook that is
slow or down never slows a wake; when its queue is full the oldest event is dropped, counted
and logged. A POST that fails (no answer within webhook_timeout, or a status other than 2xx)
is tried again after webhook_backoff seconds, doubled each time (at most 30), up to
webhook_attempts tries; then the event is given up, counted and logged.

The signature, as common webhook schemes make it: `X-Mvm-Signature: t=<unix seconds>,v1=<hex>`
where hex is HMAC-SHA256 over `<t>.<body>` keyed with the webhook's secret. A receiver
recomputes it and refuses a `t` too far from its clock (a replayed POST).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import deque

import aiohttp

from vmm.events import Event, EventsSettings, Webhook
from vmm.jsonlog import log
from vmm.tasks import cancelled

from .metrics import Metrics

MAX_BACKOFF = 30.0
SIGNATURE_HEADER = "X-Mvm-Signature"


def signature(secret: str, body: bytes, at: int) -> str:
    """The X-Mvm-Signature value of `body` sent at unix time `at`."""
    digest = hmac.new(secret.encode(), b"%d." % at + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={digest}"


def verify(secret: str, body: bytes, header: str, tolerance: float = 300.0) -> bool:
    """What a receiver does: the signature matches and its time is within `tolerance` seconds."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    if not fields.get("t", "").isdigit():
        return False
    at = int(fields["t"])
    expected = signature(secret, body, at).partition(",v1=")[2]
    return abs(time.time() - at) <= tolerance and hmac.compare_digest(expected, fields.get("v1", ""))


class WebhookSender:
    """One webhook's queue and the task that delivers it."""

    def __init__(self, hook: Webhook, settings: EventsSettings, metrics: Metrics) -> None:
        self.hook = hook
        self.settings = settings
        self.metrics = metrics
        self.queue: deque[Event] = deque()  # waiting; the one being delivered is out of it
        self._ready = asyncio.Event()
        self.dropped = 0

    def offer(self, ev: Event) -> None:
        """Queue an event (never blocks): a full queue drops its oldest."""
        if self.hook.types and ev.type not in self.hook.types:
            return
        if len(self.queue) >= self.settings.webhook_queue:
            lost = self.queue.popleft()
            self.dropped += 1
            self.metrics.webhook("dropped")
            log.event("events.webhook_dropped", level="warning", url=self.hook.url, vm=lost.vm, seq=lost.seq,
                      dropped=self.dropped)  # fmt: skip
        self.queue.append(ev)
        self._ready.set()

    async def run(self, http: aiohttp.ClientSession) -> None:
        while True:
            while not self.queue:
                self._ready.clear()
                await self._ready.wait()
            await self._deliver(http, self.queue.popleft())

    async def _deliver(self, http: aiohttp.ClientSession, ev: Event) -> None:
        body = ev.to_json()
        delay = self.settings.webhook_backoff
        for attempt in range(1, self.settings.webhook_attempts + 1):
            error = await self._post(http, ev, body)
            if error is None:
                self.metrics.webhook("delivered")
                return
            if attempt == self.settings.webhook_attempts:
                break
            self.metrics.webhook("retried")
            log.event("events.webhook_retry", level="warning", url=self.hook.url, vm=ev.vm, seq=ev.seq,
                      attempt=attempt, error=error, delay=delay)  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)
        self.metrics.webhook("failed")
        log.event("events.webhook_failed", level="error", url=self.hook.url, vm=ev.vm, seq=ev.seq,
                  attempts=self.settings.webhook_attempts, error=error)  # fmt: skip

    async def _post(self, http: aiohttp.ClientSession, ev: Event, body: bytes) -> str | None:
        """One POST; None if it was taken (2xx), else what went wrong."""
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature(self.hook.secret, body, int(time.time())),
            "X-Mvm-Event": ev.type,
            "X-Mvm-Event-Id": str(ev.seq),
        }
        try:
            timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout)
            async with http.post(self.hook.url, data=body, headers=headers, timeout=timeout) as resp:
                await resp.read()
                return None if 200 <= resp.status < 300 else f"answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"


class Webhooks:
    """Every configured webhook, fed by the event ring; started and stopped with the process."""

    def __init__(self, settings: EventsSettings, metrics: Metrics) -> None:
        self.senders = [WebhookSender(hook, settings, metrics) for hook in settings.webhooks]
        self._http: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def offer(self, ev: Event) -> None:
        for sender in self.senders:
            sender.offer(ev)

    def start(self) -> None:
        """Deliver every event offered from now on (a task per webhook; none without webhooks)."""
        if not self.senders:
            return
        self._http = aiohttp.ClientSession()
        self._tasks = [asyncio.create_task(sender.run(self._http)) for sender in self.senders]

    async def stop(self) -> None:
        await cancelled(self._tasks)
        if self._http is not None:
            await self._http.close()
