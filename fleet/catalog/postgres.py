"""The shared catalog on PostgreSQL: many VM hosts and edges, one database.

Every write that changes a VM's route or state calls pg_notify in the same statement, so a
notification goes out exactly when the change commits (and never for a rolled-back one).
Each catalog LISTENs on its own connection, outside the pool, once something subscribes;
if that connection is lost it is made again (a bounded number of times) and subscribers are
told of the gap, since notifications sent meanwhile are gone.
The compare-and-set is a conditional UPDATE: concurrent callers queue on the row lock and
re-check the state after the winner commits, so only one of them matches.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from vmm.errors import CatalogError, Conflict, NotFound
from vmm.events import Event
from vmm.jsonlog import log
from vmm.model import VmRecord, VmState

from .api import Capacity, ChangeCallback, GapCallback, HostRecord, PlacedVm, Unsubscribe
from .feed import Subscribers
from .migrations import SCHEMA_VERSION_POSTGRES, pending
from .rows import VM_COLUMNS, VM_FIELDS, placed_vm, vm_values

CHANNEL = "mvm_vm_changed"
CONNECT_TIMEOUT = 5.0  # seconds; an unreachable server is reported instead of hanging the start
COMMAND_TIMEOUT = 30.0  # seconds one statement may take, so a stalled server cannot hang a caller
CLOSE_TIMEOUT = 10.0  # seconds to let queries finish before connections are cut
RELISTEN_ATTEMPTS = 10  # with delays doubling from RELISTEN_FIRST_DELAY up to RELISTEN_MAX_DELAY: ~2 minutes
RELISTEN_FIRST_DELAY = 0.2
RELISTEN_MAX_DELAY = 30.0
_MIGRATION_LOCK = 0x6D766D63  # advisory lock key ("mvmc"): one process migrates at a time
_CONNECT_ERRORS = (OSError, TimeoutError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError)
_STORE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def redact(url: str) -> str:
    """The URL without its password (in the user part or as ?password=), fit for errors and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a URL that does not parse)"
    if parts.password is not None:
        parts = parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}")
    query = [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(query, safe="/*")))


@contextmanager
def _store_errors(url: str) -> Iterator[None]:
    """A failing server or connection becomes CatalogError (503); a unique violation is the caller's to handle."""
    try:
        yield
    except asyncpg.UniqueViolationError:
        raise
    except _STORE_ERRORS as exc:
        raise CatalogError(f"catalog: {redact(url)}: {exc}") from exc


async def migrate(conn: Any, upto: int | None = None) -> tuple[int, ...]:
    """Bring the schema to version `upto` (default: the latest); returns the versions applied."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(SCHEMA_VERSION_POSTGRES)
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
        steps = pending(current, upto)
        for step in steps:
            for statement in step.postgres:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES ($1, $2, $3)",
                step.version,
                step.name,
                time.time(),
            )
    for step in steps:
        log.event("catalog.migrated", backend="postgres", version=step.version, name=step.name)
    return tuple(step.version for step in steps)


async def open_postgres(url: str, pool_size: int = 10, upto: int | None = None) -> PostgresCatalog:
    """Connect a pool and migrate; errors name `catalog.url`. `upto` stops at an older version (tests)."""
    try:
        pool = await asyncpg.create_pool(
            url, min_size=1, max_size=pool_size, timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT
        )
    except _CONNECT_ERRORS as exc:
        raise CatalogError(f"catalog.url: cannot connect to {redact(url)}: {exc}") from None
    try:
        async with pool.acquire() as conn:
            migrated = await migrate(conn, upto)
    except _STORE_ERRORS as exc:
        pool.terminate()
        raise CatalogError(f"catalog.url: cannot prepare the catalog schema in {redact(url)}: {exc}") from None
    log.event("catalog.opened", backend="postgres", url=redact(url), pool_size=pool_size)
    return PostgresCatalog(url, pool, migrated)


class PostgresCatalog:
    """The Catalog protocol over an asyncpg pool, plus one LISTEN connection for the change feed."""

    backend = "postgres"

    def __init__(self, url: str, pool: Any, migrated: tuple[int, ...]) -> None:
        self._url = url
        self._pool = pool
        self._listener: Any = None
        self._listen_lock = asyncio.Lock()
        self._relisten_task: asyncio.Task[None] | None = None
        self._subscribers = Subscribers()
        self.migrated = migrated

    async def _execute(self, query: str, *args: Any) -> str:
        with _store_errors(self._url):
            return cast(str, await self._pool.execute(query, *args))

    async def _fetch(self, query: str, *args: Any) -> list[Any]:
        with _store_errors(self._url):
            return cast(list[Any], await self._pool.fetch(query, *args))

    async def _fetchrow(self, query: str, *args: Any) -> Any:
        with _store_errors(self._url):
            return await self._pool.fetchrow(query, *args)

    async def close(self) -> None:
        if self._relisten_task is not None:
            self._relisten_task.cancel()
        if self._listener is not None:
            self._listener.remove_termination_listener(self._feed_lost)  # closing it here is no loss
            await self._listener.close(timeout=CLOSE_TIMEOUT)
        try:
            await asyncio.wait_for(self._pool.close(), CLOSE_TIMEOUT)
        except TimeoutError:
            self._pool.terminate()

    async def heartbeat(self, host_id: str, address: str, capacity: Capacity, at: float) -> None:
        await self._execute(
            "INSERT INTO hosts (id, address, memory_mb, vcpus, disk_mb, heartbeat_at, up)"
            " VALUES ($1, $2, $3, $4, $5, $6, true) ON CONFLICT (id) DO UPDATE SET address = excluded.address,"
            " memory_mb = excluded.memory_mb, vcpus = excluded.vcpus, disk_mb = excluded.disk_mb,"
            " heartbeat_at = excluded.heartbeat_at, up = true",
            host_id,
            address,
            capacity.memory_mb,
            capacity.vcpus,
            capacity.disk_mb,
            at,
        )

    async def hosts(self) -> list[HostRecord]:
        rows = await self._fetch(
            "SELECT id, address, memory_mb, vcpus, disk_mb, heartbeat_at, up FROM hosts ORDER BY id"
        )
        return [HostRecord(r[0], r[1], Capacity(r[2], r[3], r[4]), r[5], r[6]) for r in rows]

    async def mark_down(self, older_than: float) -> list[str]:
        rows = await self._fetch("UPDATE hosts SET up = false WHERE up AND heartbeat_at < $1 RETURNING id", older_than)
        down = sorted(r[0] for r in rows)
        if down:
            log.event("catalog.hosts_down", level="warning", hosts=down, older_than=older_than)
        return down

    async def create_vm(self, rec: VmRecord, host_id: str) -> None:
        marks = ", ".join(f"${i}" for i in range(1, 3 + len(VM_FIELDS)))
        try:
            await self._execute(
                f"WITH changed AS (INSERT INTO vms ({VM_COLUMNS}) VALUES ({marks}) RETURNING id)"
                f" SELECT pg_notify('{CHANNEL}', id) FROM changed",
                rec.id,
                host_id,
                *vm_values(rec),
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"VM {rec.id} already exists") from None

    async def get_vm(self, vm_id: str) -> PlacedVm | None:
        row = await self._fetchrow(f"SELECT {VM_COLUMNS} FROM vms WHERE id = $1", vm_id)
        return None if row is None else placed_vm(row)

    async def list_vms(self, host_id: str | None = None, states: Collection[VmState] | None = None) -> list[PlacedVm]:
        rows = await self._fetch(
            f"SELECT {VM_COLUMNS} FROM vms WHERE ($1::text IS NULL OR host_id = $1)"
            " AND ($2::text[] IS NULL OR state = ANY($2)) ORDER BY created_at, id",
            host_id,
            None if states is None else [s.value for s in states],
        )
        return [placed_vm(r) for r in rows]

    async def save_vm(self, rec: VmRecord, host_id: str | None = None) -> None:
        assignments = ", ".join(f"{c} = ${i}" for i, c in enumerate(VM_FIELDS, start=3))
        rows = await self._fetch(
            f"WITH changed AS (UPDATE vms SET {assignments} WHERE id = $1 AND ($2::text IS NULL OR host_id = $2)"
            f" RETURNING id) SELECT pg_notify('{CHANNEL}', id) FROM changed",
            rec.id,
            host_id,
            *vm_values(rec),
        )
        if not rows:
            raise NotFound(f"VM {rec.id} is not in the catalog" + (f" on host {host_id}" if host_id else ""))

    async def delete_vm(self, vm_id: str, host_id: str | None = None) -> bool:
        rows = await self._fetch(
            "WITH changed AS (DELETE FROM vms WHERE id = $1 AND ($2::text IS NULL OR host_id = $2) RETURNING id)"
            f" SELECT pg_notify('{CHANNEL}', id) FROM changed",
            vm_id,
            host_id,
        )
        return bool(rows)

    async def move_vm(self, vm_id: str, from_host: str, to_host: str) -> bool:
        rows = await self._fetch(
            "WITH changed AS (UPDATE vms SET host_id = $3 WHERE id = $1 AND host_id = $2 RETURNING id)"
            f" SELECT pg_notify('{CHANNEL}', id) FROM changed",
            vm_id,
            from_host,
            to_host,
        )
        return bool(rows)

    async def set_state(
        self, vm_id: str, from_states: Collection[VmState], to_state: VmState, at: float | None = None
    ) -> bool:
        rows = await self._fetch(
            "WITH changed AS (UPDATE vms SET state = $3, state_changed_at = $4"
            " WHERE id = $1 AND state = ANY($2::text[]) RETURNING id)"
            f" SELECT pg_notify('{CHANNEL}', id) FROM changed",
            vm_id,
            [s.value for s in from_states],
            to_state.value,
            time.time() if at is None else at,
        )
        return bool(rows)

    async def touch_many(self, activity: Mapping[str, float]) -> None:
        if not activity:
            return
        await self._execute(
            "UPDATE vms SET last_activity = greatest(vms.last_activity, a.at)"
            " FROM unnest($1::text[], $2::float8[]) AS a(id, at) WHERE vms.id = a.id",
            list(activity),
            list(activity.values()),
        )

    async def add_template(self, name: str, host_id: str) -> None:
        await self._execute(
            "INSERT INTO templates (name, host_id) VALUES ($1, $2) ON CONFLICT DO NOTHING", name, host_id
        )

    async def remove_template(self, name: str, host_id: str) -> None:
        await self._execute("DELETE FROM templates WHERE name = $1 AND host_id = $2", name, host_id)

    async def template_hosts(self, name: str) -> set[str]:
        rows = await self._fetch("SELECT host_id FROM templates WHERE name = $1", name)
        return {r[0] for r in rows}

    async def append_events(self, host_id: str, events: Sequence[Event]) -> list[Event]:
        with _store_errors(self._url):
            async with self._pool.acquire() as conn, conn.transaction():
                # One append at a time: a later seq never commits before an earlier one.
                await conn.execute("LOCK TABLE events IN EXCLUSIVE MODE")
                last = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM events")
                numbered = [ev.renumbered(last + i) for i, ev in enumerate(events, 1)]
                await conn.executemany(
                    "INSERT INTO events (seq, time, body, host_id, host_seq) VALUES ($1, $2, $3, $4, $5)",
                    [
                        (n.seq, n.time, n.to_json().decode(), host_id, e.seq)
                        for n, e in zip(numbered, events, strict=True)
                    ],
                )
        return numbered

    async def events_after(self, seq: int, limit: int) -> list[Event]:
        rows = await self._fetch("SELECT seq, body FROM events WHERE seq > $1 ORDER BY seq LIMIT $2", seq, limit)
        return [Event.from_json(r[0], r[1]) for r in rows]

    async def last_host_seq(self, host_id: str) -> int:
        row = await self._fetchrow("SELECT coalesce(max(host_seq), 0) FROM events WHERE host_id = $1", host_id)
        return int(row[0])

    async def trim_events(self, keep: int, older_than: float) -> None:
        await self._execute(
            "DELETE FROM events WHERE seq <= (SELECT max(seq) FROM events) - $1"
            " OR (time < $2 AND seq < (SELECT max(seq) FROM events))", keep, older_than,
        )  # fmt: skip

    async def subscribe(self, callback: ChangeCallback, on_gap: GapCallback | None = None) -> Unsubscribe:
        async with self._listen_lock:
            relistening = self._relisten_task is not None and not self._relisten_task.done()
            if self._listener is None and not relistening:
                self._listener = await self._listen()
        return self._subscribers.add(callback, on_gap)

    async def _listen(self) -> Any:
        """A connection outside the pool that LISTENs, and reports its own loss."""
        try:
            listener = await asyncpg.connect(self._url, timeout=CONNECT_TIMEOUT)
        except _CONNECT_ERRORS as exc:
            raise CatalogError(f"catalog.url: cannot connect to {redact(self._url)}: {exc}") from None
        try:
            await listener.add_listener(CHANNEL, self._notified)
        except _STORE_ERRORS as exc:
            listener.terminate()
            raise CatalogError(f"catalog.url: cannot LISTEN on {redact(self._url)}: {exc}") from None
        listener.add_termination_listener(self._feed_lost)
        return listener

    def _notified(self, _conn: Any, _pid: int, _channel: str, vm_id: str) -> None:
        self._subscribers.changed(vm_id)

    def _feed_lost(self, conn: Any) -> None:
        if conn is not self._listener:
            return
        log.event("catalog.feed_lost", level="error", url=redact(self._url))
        self._listener = None
        self._relisten_task = asyncio.get_running_loop().create_task(self._relisten())

    async def _relisten(self) -> None:
        """LISTEN again, RELISTEN_ATTEMPTS times at most with doubling delays; then tell of the gap."""
        delay = RELISTEN_FIRST_DELAY
        for attempt in range(1, RELISTEN_ATTEMPTS + 1):
            await asyncio.sleep(delay)
            delay = min(2 * delay, RELISTEN_MAX_DELAY)
            try:
                self._listener = await self._listen()
            except CatalogError as exc:
                log.event("catalog.feed_retry", level="warning", attempt=attempt, error=str(exc))
                continue
            log.event("catalog.feed_restored", attempts=attempt)
            self._subscribers.gap()
            return
        log.event("catalog.feed_gave_up", level="error", attempts=RELISTEN_ATTEMPTS)
