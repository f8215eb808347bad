"""The embedded catalog: one SQLite file, for a single host that is its own edge.

sqlite3 blocks, so every call runs on one worker thread that owns the connection; the event
loop never waits on the disk. WAL lets readers (e.g. `mvm vm ls` in another process) run
beside a writer, and the busy timeout makes writers from other processes queue instead of
failing. The change feed is in-process only: with one host there is nobody else to tell.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from vmm.errors import CatalogError, Conflict, NotFound
from vmm.events import Event
from vmm.jsonlog import log
from vmm.model import VmRecord, VmState

from .api import Capacity, ChangeCallback, GapCallback, HostRecord, PlacedVm, Unsubscribe
from .feed import Subscribers
from .migrations import SCHEMA_VERSION_SQLITE, pending
from .rows import VM_COLUMNS, VM_FIELDS, placed_vm, vm_values

T = TypeVar("T")
BUSY_TIMEOUT = 5.0  # seconds a writer waits for another process's write lock


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE takes the write lock up front, so a read-then-write cannot be overtaken."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _use_wal(db: sqlite3.Connection) -> None:
    """Switch to WAL. The switch needs the file to itself and SQLite does not wait for that (no busy
    handler), so processes opening a new catalog at once retry here, up to the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _connect(path: Path, upto: int | None) -> tuple[sqlite3.Connection, tuple[int, ...]]:
    """Connect and migrate; a connection whose migration failed is closed again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT)
    try:
        _use_wal(db)
        db.execute("PRAGMA synchronous=NORMAL")
        return db, migrate(db, upto)
    except BaseException:
        db.close()
        raise


def migrate(db: sqlite3.Connection, upto: int | None = None) -> tuple[int, ...]:
    """Bring the schema to version `upto` (default: the latest); returns the versions applied."""
    with _transaction(db):
        db.execute(SCHEMA_VERSION_SQLITE)
        current = db.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
        steps = pending(current, upto)
        for step in steps:
            for statement in step.sqlite:
                if not _adds_existing_column(db, statement):
                    db.execute(statement)
            db.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                (step.version, step.name, time.time()),
            )
    for step in steps:
        log.event("catalog.migrated", backend="sqlite", version=step.version, name=step.name)
    return tuple(step.version for step in steps)


def _adds_existing_column(db: sqlite3.Connection, statement: str) -> bool:
    """An `ALTER TABLE t ADD COLUMN c ...` whose column is there already: a registry file
    being adopted has its newer columns (SQLite has no ADD COLUMN IF NOT EXISTS)."""
    words = statement.split()
    if [w.upper() for w in words[:2]] != ["ALTER", "TABLE"] or [w.upper() for w in words[3:5]] != ["ADD", "COLUMN"]:
        return False
    return words[5] in {row[1] for row in db.execute(f"PRAGMA table_info({words[2]})")}


async def open_sqlite(path: Path, upto: int | None = None) -> SqliteCatalog:
    """Open (creating if needed) and migrate the catalog file; `upto` stops at an older version (tests)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catalog-sqlite")
    loop = asyncio.get_running_loop()
    try:
        db, migrated = await loop.run_in_executor(executor, _connect, path, upto)
    except (sqlite3.Error, OSError) as exc:
        executor.shutdown(wait=False)
        raise CatalogError(f"catalog: cannot open the embedded catalog {path}: {exc}") from None
    log.event("catalog.opened", backend="sqlite", path=str(path))
    return SqliteCatalog(path, db, executor, migrated)


class SqliteCatalog:
    """The Catalog protocol over one SQLite connection owned by one worker thread."""

    backend = "sqlite"

    def __init__(
        self, path: Path, db: sqlite3.Connection, executor: ThreadPoolExecutor, migrated: tuple[int, ...]
    ) -> None:
        self._path = path
        self._db = db
        self._executor = executor
        self._subscribers = Subscribers()
        self.migrated = migrated
        self._reader: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the connection's thread; a failing database becomes CatalogError (503)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, self._db)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise CatalogError(f"catalog: the embedded catalog {self._path}: {exc}") from exc

    async def close(self) -> None:
        await self._run(lambda db: db.close())
        self._executor.shutdown(wait=False)
        if self._reader is not None:
            self._reader.close()

    async def heartbeat(self, host_id: str, address: str, capacity: Capacity, at: float) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO hosts (id, address, memory_mb, vcpus, disk_mb, heartbeat_at, up)"
                " VALUES (?, ?, ?, ?, ?, ?, 1) ON CONFLICT (id) DO UPDATE SET address = excluded.address,"
                " memory_mb = excluded.memory_mb, vcpus = excluded.vcpus, disk_mb = excluded.disk_mb,"
                " heartbeat_at = excluded.heartbeat_at, up = 1",
                (host_id, address, capacity.memory_mb, capacity.vcpus, capacity.disk_mb, at),
            )

        await self._run(write)

    async def hosts(self) -> list[HostRecord]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT id, address, memory_mb, vcpus, disk_mb, heartbeat_at, up FROM hosts ORDER BY id"
            ).fetchall()
        )
        return [HostRecord(r[0], r[1], Capacity(r[2], r[3], r[4]), r[5], bool(r[6])) for r in rows]

    async def mark_down(self, older_than: float) -> list[str]:
        rows = await self._run(
            lambda db: db.execute(
                "UPDATE hosts SET up = 0 WHERE up = 1 AND heartbeat_at < ? RETURNING id", (older_than,)
            ).fetchall()
        )
        down = sorted(r[0] for r in rows)
        if down:
            log.event("catalog.hosts_down", level="warning", hosts=down, older_than=older_than)
        return down

    async def _change_vm(self, vm_id: str, query: str, args: Sequence[object]) -> bool:
        """One write of a VM's row; subscribers hear of a change even if the caller is cancelled meanwhile."""
        loop = asyncio.get_running_loop()

        def write(db: sqlite3.Connection) -> bool:
            changed = db.execute(query, args).rowcount > 0
            if changed:
                loop.call_soon_threadsafe(self._subscribers.changed, vm_id)  # runs before the caller resumes
            return changed

        return await self._run(write)

    async def create_vm(self, rec: VmRecord, host_id: str) -> None:
        try:
            await self._change_vm(
                rec.id,
                f"INSERT INTO vms ({VM_COLUMNS}) VALUES ({','.join('?' * (2 + len(VM_FIELDS)))})",
                (rec.id, host_id, *vm_values(rec)),
            )
        except sqlite3.IntegrityError:
            raise Conflict(f"VM {rec.id} already exists") from None

    def open_reader(self) -> sqlite3.Connection:
        """The read-only connection of get_vm_now; a worker opens it before it gives up root."""
        if self._reader is None:
            self._reader = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, check_same_thread=False)
            self._reader.execute("SELECT 1 FROM vms LIMIT 1").fetchall()  # opens the WAL files too
        return self._reader

    def get_vm_now(self, vm_id: str) -> PlacedVm | None:
        """One VM, read on the calling thread from a read-only connection of its own.

        For an edge worker whose routing table has not polled a VM created a moment ago (by
        another process): one indexed read of a local file, done only on such a miss.
        """
        try:
            row = self.open_reader().execute(f"SELECT {VM_COLUMNS} FROM vms WHERE id = ?", (vm_id,)).fetchone()
        except sqlite3.Error as exc:
            raise CatalogError(f"catalog: the embedded catalog {self._path}: {exc}") from exc
        return None if row is None else placed_vm(row)

    async def get_vm(self, vm_id: str) -> PlacedVm | None:
        row = await self._run(lambda db: db.execute(f"SELECT {VM_COLUMNS} FROM vms WHERE id = ?", (vm_id,)).fetchone())
        return None if row is None else placed_vm(row)

    async def list_vms(self, host_id: str | None = None, states: Collection[VmState] | None = None) -> list[PlacedVm]:
        where: list[str] = ["1"]
        args: list[object] = []
        if host_id is not None:
            where.append("host_id = ?")
            args.append(host_id)
        if states is not None:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(s.value for s in states)
        query = f"SELECT {VM_COLUMNS} FROM vms WHERE {' AND '.join(where)} ORDER BY created_at, id"
        rows = await self._run(lambda db: db.execute(query, args).fetchall())
        return [placed_vm(r) for r in rows]

    async def save_vm(self, rec: VmRecord, host_id: str | None = None) -> None:
        assignments = ", ".join(f"{c} = ?" for c in VM_FIELDS)
        query = f"UPDATE vms SET {assignments} WHERE id = ? AND (? IS NULL OR host_id = ?)"
        if not await self._change_vm(rec.id, query, (*vm_values(rec), rec.id, host_id, host_id)):
            raise NotFound(f"VM {rec.id} is not in the catalog" + (f" on host {host_id}" if host_id else ""))

    async def delete_vm(self, vm_id: str, host_id: str | None = None) -> bool:
        query = "DELETE FROM vms WHERE id = ? AND (? IS NULL OR host_id = ?)"
        return await self._change_vm(vm_id, query, (vm_id, host_id, host_id))

    async def move_vm(self, vm_id: str, from_host: str, to_host: str) -> bool:
        query = "UPDATE vms SET host_id = ? WHERE id = ? AND host_id = ?"
        return await self._change_vm(vm_id, query, (to_host, vm_id, from_host))

    async def set_state(
        self, vm_id: str, from_states: Collection[VmState], to_state: VmState, at: float | None = None
    ) -> bool:
        marks = ",".join("?" * len(from_states))
        return await self._change_vm(
            vm_id,
            f"UPDATE vms SET state = ?, state_changed_at = ? WHERE id = ? AND state IN ({marks})",
            (to_state.value, time.time() if at is None else at, vm_id, *(s.value for s in from_states)),
        )

    async def touch_many(self, activity: Mapping[str, float]) -> None:
        def write(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.executemany(
                    "UPDATE vms SET last_activity = max(last_activity, ?) WHERE id = ?",
                    [(at, vm_id) for vm_id, at in activity.items()],
                )

        await self._run(write)

    async def add_template(self, name: str, host_id: str) -> None:
        await self._run(
            lambda db: db.execute("INSERT OR IGNORE INTO templates (name, host_id) VALUES (?, ?)", (name, host_id))
        )

    async def remove_template(self, name: str, host_id: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM templates WHERE name = ? AND host_id = ?", (name, host_id)))

    async def template_hosts(self, name: str) -> set[str]:
        query = "SELECT host_id FROM templates WHERE name = ?"
        rows = await self._run(lambda db: db.execute(query, (name,)).fetchall())
        return {r[0] for r in rows}

    async def append_events(self, host_id: str, events: Sequence[Event]) -> list[Event]:
        def write(db: sqlite3.Connection) -> list[Event]:
            with _transaction(db):  # BEGIN IMMEDIATE: appends of other processes queue behind this one
                last = db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
                numbered = [ev.renumbered(last + i) for i, ev in enumerate(events, 1)]
                db.executemany(
                    "INSERT INTO events (seq, time, body, host_id, host_seq) VALUES (?, ?, ?, ?, ?)",
                    [
                        (n.seq, n.time, n.to_json().decode(), host_id, e.seq)
                        for n, e in zip(numbered, events, strict=True)
                    ],
                )
            return numbered

        return await self._run(write)

    async def events_after(self, seq: int, limit: int) -> list[Event]:
        query = "SELECT seq, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?"
        rows = await self._run(lambda db: db.execute(query, (seq, limit)).fetchall())
        return [Event.from_json(r[0], r[1]) for r in rows]

    async def last_host_seq(self, host_id: str) -> int:
        query = "SELECT coalesce(max(host_seq), 0) FROM events WHERE host_id = ?"
        return int(await self._run(lambda db: db.execute(query, (host_id,)).fetchone()[0]))

    async def trim_events(self, keep: int, older_than: float) -> None:
        def trim(db: sqlite3.Connection) -> None:
            with _transaction(db):
                newest = db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
                db.execute("DELETE FROM events WHERE seq <= ? OR (time < ? AND seq < ?)",
                           (newest - keep, older_than, newest))  # fmt: skip

        await self._run(trim)

    async def subscribe(self, callback: ChangeCallback, on_gap: GapCallback | None = None) -> Unsubscribe:
        """In-process, so the feed never breaks and `on_gap` is never called."""
        return self._subscribers.add(callback, on_gap)
