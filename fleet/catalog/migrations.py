"""The catalog schema as an ordered list of migrations, written for both backends side by side.

Each start applies the migrations newer than the highest version in `schema_version`, all in
one transaction with the version rows, so a start that dies half-way leaves the old schema
and the next start tries again. Version 1 is the embedded registry's `vms` table, column for
column, so an existing registry file is adopted as it is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    """One schema step: the same change in each backend's SQL dialect."""

    version: int
    name: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


SCHEMA_VERSION_SQLITE = (
    "CREATE TABLE IF NOT EXISTS schema_version"
    " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
)
SCHEMA_VERSION_POSTGRES = (
    "CREATE TABLE IF NOT EXISTS schema_version"
    " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "vms",
        sqlite=(
            """CREATE TABLE IF NOT EXISTS vms (
                id TEXT PRIMARY KEY, template TEXT NOT NULL, state TEXT NOT NULL, policy TEXT NOT NULL,
                app_port INTEGER NOT NULL, created_at REAL NOT NULL, last_activity REAL NOT NULL,
                state_changed_at REAL NOT NULL, ram_mode TEXT NOT NULL, pid INTEGER, reason TEXT)""",
        ),
        postgres=(
            """CREATE TABLE vms (
                id TEXT PRIMARY KEY, template TEXT NOT NULL, state TEXT NOT NULL, policy TEXT NOT NULL,
                app_port INTEGER NOT NULL, created_at DOUBLE PRECISION NOT NULL,
                last_activity DOUBLE PRECISION NOT NULL, state_changed_at DOUBLE PRECISION NOT NULL,
                ram_mode TEXT NOT NULL, pid INTEGER, reason TEXT)""",
        ),
    ),
    Migration(
        2,
        "hosts, VM placement and templates by host",
        sqlite=(
            """CREATE TABLE hosts (
                id TEXT PRIMARY KEY, address TEXT NOT NULL, memory_mb INTEGER NOT NULL, vcpus INTEGER NOT NULL,
                disk_mb INTEGER NOT NULL, heartbeat_at REAL NOT NULL, up INTEGER NOT NULL)""",
            "ALTER TABLE vms ADD COLUMN host_id TEXT NOT NULL DEFAULT ''",
            "CREATE INDEX vms_by_host_state ON vms (host_id, state)",
            "CREATE TABLE templates (name TEXT NOT NULL, host_id TEXT NOT NULL, PRIMARY KEY (name, host_id))",
        ),
        postgres=(
            """CREATE TABLE hosts (
                id TEXT PRIMARY KEY, address TEXT NOT NULL, memory_mb INTEGER NOT NULL, vcpus INTEGER NOT NULL,
                disk_mb INTEGER NOT NULL, heartbeat_at DOUBLE PRECISION NOT NULL, up BOOLEAN NOT NULL)""",
            "ALTER TABLE vms ADD COLUMN host_id TEXT NOT NULL DEFAULT ''",
            "CREATE INDEX vms_by_host_state ON vms (host_id, state)",
            "CREATE TABLE templates (name TEXT NOT NULL, host_id TEXT NOT NULL, PRIMARY KEY (name, host_id))",
        ),
    ),
    Migration(
        3,
        "VM generations (bumped at every suspend and restore)",
        sqlite=("ALTER TABLE vms ADD COLUMN generation INTEGER NOT NULL DEFAULT 0",),
        postgres=("ALTER TABLE vms ADD COLUMN generation BIGINT NOT NULL DEFAULT 0",),
    ),
    Migration(
        4,
        "lifecycle events, numbered across the fleet (seq), each with its host's own number (host_seq)",
        sqlite=(
            "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, time REAL NOT NULL, body TEXT NOT NULL)",
            "ALTER TABLE events ADD COLUMN host_id TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE events ADD COLUMN host_seq INTEGER NOT NULL DEFAULT 0",
            "CREATE INDEX events_by_host ON events (host_id, host_seq)",
        ),
        postgres=(
            """CREATE TABLE events (seq BIGINT PRIMARY KEY, time DOUBLE PRECISION NOT NULL, body TEXT NOT NULL,
                host_id TEXT NOT NULL DEFAULT '', host_seq BIGINT NOT NULL DEFAULT 0)""",
            "CREATE INDEX events_by_host ON events (host_id, host_seq)",
        ),
    ),
    Migration(
        5,
        "indexes for many VMs: listing in (created_at, id) order, by state across hosts",
        sqlite=(
            "CREATE INDEX IF NOT EXISTS vms_by_created ON vms (created_at, id)",
            "CREATE INDEX IF NOT EXISTS vms_by_state ON vms (state, created_at)",
        ),
        postgres=(
            "CREATE INDEX IF NOT EXISTS vms_by_created ON vms (created_at, id)",
            "CREATE INDEX IF NOT EXISTS vms_by_state ON vms (state, created_at)",
        ),
    ),
    Migration(
        6,
        "each VM's h2c ports (from its template), so edges reach them with HTTP/2",
        sqlite=("ALTER TABLE vms ADD COLUMN h2c_ports TEXT NOT NULL DEFAULT ''",),
        postgres=("ALTER TABLE vms ADD COLUMN h2c_ports TEXT NOT NULL DEFAULT ''",),
    ),
)


def pending(current: int, upto: int | None = None) -> list[Migration]:
    """The migrations after version `current`, up to `upto` (default: the latest)."""
    last = MIGRATIONS[-1].version if upto is None else upto
    return [m for m in MIGRATIONS if current < m.version <= last]
