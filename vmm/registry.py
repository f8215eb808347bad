"""The VM registry: one SQLite file, so suspended VMs outlive a restart of the manager.

Writes happen on state transitions and on a periodic flush of activity times, never per
request. WAL mode keeps a write from blocking concurrent readers (e.g. `mvm vm ls`).
Every QEMU the manager starts is written here (pid, start time, purpose) before anything
depends on it, so a manager that restarts after a crash finds and ends every process a
transition left behind.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import faults
from .events import Event
from .model import VmRecord
from .record_rows import RECORD_COLUMNS, RECORD_FIELDS, record_from, record_values

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    id TEXT PRIMARY KEY,
    template TEXT NOT NULL,
    state TEXT NOT NULL,
    policy TEXT NOT NULL,
    app_port INTEGER NOT NULL,
    created_at REAL NOT NULL,
    last_activity REAL NOT NULL,
    state_changed_at REAL NOT NULL,
    ram_mode TEXT NOT NULL,
    pid INTEGER,
    reason TEXT,
    generation INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS processes (
    pid INTEGER PRIMARY KEY,
    vm_id TEXT NOT NULL,
    start_ticks INTEGER NOT NULL,
    purpose TEXT NOT NULL,
    started_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS vms_by_created ON vms (created_at, id);
CREATE INDEX IF NOT EXISTS processes_by_vm ON processes (vm_id);
"""
_COLUMNS = f"id, {RECORD_COLUMNS}"  # the catalog's encoding (vmm.record_rows), so one file can become the other


@dataclass(frozen=True)
class ProcessIntent:
    """A QEMU the manager started: `start_ticks` tells it from a later process with the same pid."""

    pid: int
    vm_id: str
    start_ticks: int
    purpose: str  # launch | restore | ram-move


class Registry:
    """Persistent VM records keyed by id."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(vms)")}
        if "generation" not in columns:  # a registry written before VM generations
            self.db.execute("ALTER TABLE vms ADD COLUMN generation INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        self.db.close()

    def save(self, rec: VmRecord) -> None:
        faults.point("registry.save")
        marks = ",".join("?" * (1 + len(RECORD_FIELDS)))
        self.db.execute(f"INSERT OR REPLACE INTO vms ({_COLUMNS}) VALUES ({marks})", (rec.id, *record_values(rec)))

    def save_activity(self, records: Iterable[VmRecord]) -> None:
        """Flush last-activity times in one transaction."""
        with self.db:
            self.db.executemany(
                "UPDATE vms SET last_activity = ? WHERE id = ?", [(r.last_activity, r.id) for r in records]
            )

    def delete(self, vm_id: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM vms WHERE id = ?", (vm_id,))
            self.db.execute("DELETE FROM processes WHERE vm_id = ?", (vm_id,))

    def add_process(self, intent: ProcessIntent, started_at: float) -> None:
        faults.point("registry.add_process")
        self.db.execute(
            "INSERT OR REPLACE INTO processes (pid, vm_id, start_ticks, purpose, started_at) VALUES (?,?,?,?,?)",
            (intent.pid, intent.vm_id, intent.start_ticks, intent.purpose, started_at),
        )

    def remove_process(self, pid: int) -> None:
        self.db.execute("DELETE FROM processes WHERE pid = ?", (pid,))

    def processes(self, vm_id: str) -> list[ProcessIntent]:
        rows = self.db.execute(
            "SELECT pid, vm_id, start_ticks, purpose FROM processes WHERE vm_id = ?", (vm_id,)
        ).fetchall()
        return [ProcessIntent(*row) for row in rows]

    def add_event(self, ev: Event) -> None:
        faults.point("registry.add_event")
        self.db.execute("INSERT OR REPLACE INTO events (seq, time, body) VALUES (?, ?, ?)",
                        (ev.seq, ev.time, ev.to_json().decode()))  # fmt: skip

    def load_events(self, limit: int) -> list[Event]:
        """The newest `limit` events, oldest first."""
        rows = self.db.execute("SELECT seq, body FROM events ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [Event.from_json(seq, body) for seq, body in reversed(rows)]

    def trim_events(self, keep: int, older_than: float) -> None:
        """Drop all but the newest `keep` events and those older than `older_than` (the newest holds the seq)."""
        with self.db:
            newest = self.db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
            self.db.execute("DELETE FROM events WHERE seq <= ? OR (time < ? AND seq < ?)",
                            (newest - keep, older_than, newest))  # fmt: skip

    def load_all(self) -> list[VmRecord]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM vms ORDER BY created_at, id").fetchall()
        return [record_from(row[0], row[1:]) for row in rows]
