"""Lifecycle events: one per VM state change, numbered by `seq`, kept for a bounded count and age.

Programs follow them instead of polling (`GET /v1/events`, `mvm events -f`, webhooks). A
`Lifecycle` move names its event (`event_type`); the record store numbers it and writes it to
the registry beside the record; an `EventRing` holds the retained ones in memory, in order,
and wakes whoever waits for the next. In a fleet the catalog numbers them instead, so every
edge serves the same sequence.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from .model import VmRecord, VmState

EVENT_TYPES = (
    "created", "running", "paused", "suspended", "restored", "failed", "terminated", "moved",
    "checkpoint_created", "checkpoint_deleted", "rewound", "forked",
)  # fmt: skip

# The state a move reaches and the event it is; transitional states (suspending, restoring,
# terminating) are no event of their own: the state they end in is.
_BY_STATE = {
    VmState.PENDING: "created",
    VmState.RUNNING: "running",
    VmState.PAUSED: "paused",
    VmState.SUSPENDED: "suspended",
    VmState.FAILED: "failed",
    VmState.TERMINATED: "terminated",
}


def event_type(old: VmState, new: VmState) -> str | None:
    """The event a move from `old` to `new` is, or None (no change, or a transitional state)."""
    if old is new:
        return None
    if old is VmState.RESTORING and new is VmState.RUNNING:
        return "restored"
    return _BY_STATE.get(new)


@dataclass(frozen=True)
class Webhook:
    """Where events are POSTed, signed with `secret`; `types` empty: every type."""

    url: str
    secret: str = field(repr=False)
    types: frozenset[str] = frozenset()


@dataclass(frozen=True)
class EventsSettings:
    """The [events] TOML table: how long events are kept, and the webhooks they go to."""

    retain_count: int = 10_000  # the newest this many are kept
    retain_seconds: float = 7 * 86400.0  # and none older than this
    keepalive: float = 15.0  # seconds between `: keepalive` comments on an idle event stream
    webhooks: tuple[Webhook, ...] = ()
    webhook_queue: int = 10_000  # events waiting per webhook; past it the oldest is dropped (counted, logged)
    webhook_attempts: int = 5  # tries per event before it is given up (counted, logged)
    webhook_backoff: float = 0.5  # seconds before the first retry, doubled after each, at most 30
    webhook_timeout: float = 5.0  # seconds for one POST


@dataclass(frozen=True)
class Event:
    """One lifecycle change as the feed serves it (its JSON is the contract's `data`)."""

    seq: int
    type: str
    vm: str
    state: str | None
    reason: str | None
    time: float
    template: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        stamp = datetime.fromtimestamp(self.time, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {"seq": self.seq, "type": self.type, "vm": self.vm, "state": self.state, "reason": self.reason,
                "time": stamp, "template": self.template, **self.extra}  # fmt: skip

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_json(cls, seq: int, body: bytes | str) -> Event:
        """An event stored as its JSON, numbered `seq` (the catalog renumbers a host's events)."""
        data = orjson.loads(body)
        known = {k: data.pop(k, None) for k in ("seq", "type", "vm", "state", "reason", "time", "template")}
        at = datetime.fromisoformat(str(known["time"]).replace("Z", "+00:00")).timestamp()
        return cls(seq, str(known["type"]), str(known["vm"]), known["state"], known["reason"], at,
                   known["template"], data)  # fmt: skip

    def renumbered(self, seq: int) -> Event:
        return Event(seq, self.type, self.vm, self.state, self.reason, self.time, self.template, self.extra)


def new_event(seq: int, kind: str, rec: VmRecord, **extra: Any) -> Event:
    return Event(seq, kind, rec.id, rec.state.value, rec.reason, time.time(), rec.template, extra)


def matches(ev: Event, vms: Collection[str] | None, types: Collection[str] | None) -> bool:
    return (not vms or ev.vm in vms) and (not types or ev.type in types)


class EventRing:
    """The retained events in memory, oldest first; `wait` returns once one newer than a seq is here."""

    def __init__(self, retain_count: int, retain_seconds: float) -> None:
        self.retain_count = retain_count
        self.retain_seconds = retain_seconds
        self._events: deque[Event] = deque()
        self.last_seq = 0
        self.listeners: list[Callable[[Event], None]] = []  # told of each new event (webhooks)
        self._arrived = asyncio.Event()

    def add(self, events: Iterable[Event]) -> None:
        """Append events newer than the last one (older or repeated seqs are ignored), then trim."""
        added = False
        for ev in events:
            if ev.seq <= self.last_seq:
                continue
            self._events.append(ev)
            self.last_seq = ev.seq
            added = True
            for listener in self.listeners:
                listener(ev)
        if added:
            self._trim()
            self._arrived.set()
            self._arrived = asyncio.Event()

    def _trim(self) -> None:
        cutoff = time.time() - self.retain_seconds
        while len(self._events) > self.retain_count or (len(self._events) > 1 and self._events[0].time < cutoff):
            self._events.popleft()

    def after(
        self, seq: int, vms: Collection[str] | None = None, types: Collection[str] | None = None
    ) -> list[Event]:
        """The retained events after `seq` that match the filters, oldest first."""
        self._trim()
        if seq >= self.last_seq:
            return []
        return [ev for ev in self._events if ev.seq > seq and matches(ev, vms, types)]

    async def wait(self, seq: int, timeout: float) -> bool:
        """True once an event after `seq` is here; False after `timeout` seconds without one."""
        if self.last_seq > seq:
            return True
        arrived = self._arrived
        try:
            await asyncio.wait_for(arrived.wait(), timeout)
        except TimeoutError:
            return False
        return True
