"""The VM registry: one SQLite file, so suspended VMs outlive a restart of the manager.

Writes happen on state transitions and on a periodic flush of activity times, never per
request. WAL mode keeps a write from blocking concurrent readers (e.g. `mvm vm ls`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

import orjson

from .model import RamMode, VmRecord, VmState
from .policy import Policy

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
    reason TEXT
)
"""
_COLUMNS = "id, template, state, policy, app_port, created_at, last_activity, state_changed_at, ram_mode, pid, reason"


class Registry:
    """Persistent VM records keyed by id."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def save(self, rec: VmRecord) -> None:
        self.db.execute(
            f"INSERT OR REPLACE INTO vms ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                rec.id,
                rec.template,
                rec.state.value,
                orjson.dumps(rec.policy.to_dict()).decode(),
                rec.app_port,
                rec.created_at,
                rec.last_activity,
                rec.state_changed_at,
                rec.ram_mode.value,
                rec.pid,
                rec.reason,
            ),
        )

    def save_activity(self, records: Iterable[VmRecord]) -> None:
        """Flush last-activity times in one transaction."""
        with self.db:
            self.db.executemany(
                "UPDATE vms SET last_activity = ? WHERE id = ?", [(r.last_activity, r.id) for r in records]
            )

    def delete(self, vm_id: str) -> None:
        self.db.execute("DELETE FROM vms WHERE id = ?", (vm_id,))

    def load_all(self) -> list[VmRecord]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM vms ORDER BY created_at").fetchall()
        return [
            VmRecord(
                id=row[0],
                template=row[1],
                state=VmState(row[2]),
                policy=Policy.from_dict(orjson.loads(row[3])),
                app_port=row[4],
                created_at=row[5],
                last_activity=row[6],
                state_changed_at=row[7],
                ram_mode=RamMode(row[8]),
                pid=row[9],
                reason=row[10],
            )
            for row in rows
        ]
