"""A real, throwaway PostgreSQL cluster for tests: a temp dir, a unix socket, no TCP port.

PostgreSQL refuses to run as root, so initdb and pg_ctl run as the `postgres` system user
(Debian's package creates it) in a directory it owns; the tests, as root, connect over the
socket as the `postgres` superuser with trust authentication, which is fine for a cluster
that lives as long as the test session and listens on no network address.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

INSTALL_HINT = "run scripts/install.sh (it installs the Debian package postgresql)"
START_TIMEOUT = 30  # seconds pg_ctl waits for the server to accept connections
SETTINGS = """
listen_addresses = ''
unix_socket_directories = '{socket_dir}'
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 16MB
max_connections = 60
"""  # speed over durability: the cluster is thrown away


class PgUnavailable(Exception):
    """PostgreSQL cannot be run here; the message says how to fix that."""


def find_bin_dir() -> Path:
    """Debian's server binaries, the newest installed major version."""
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not candidates:
        raise PgUnavailable(f"no PostgreSQL server binaries under /usr/lib/postgresql/*/bin: {INSTALL_HINT}")
    newest = max(candidates, key=lambda p: int(Path(p).parent.parent.name))
    return Path(newest).parent


class PgCluster:
    """One cluster in a temp dir; `url(dbname)` is how the tests reach a database in it."""

    def __init__(self) -> None:
        try:
            self.user = pwd.getpwnam("postgres")
        except KeyError:
            raise PgUnavailable(f"there is no `postgres` system user: {INSTALL_HINT}") from None
        self.bin_dir = find_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="mvm-pg-"))
        os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        os.chmod(self.root, 0o711)  # the socket is in it: edge workers reach it after they dropped root
        self.data = self.root / "data"

    def _as_postgres(self, *argv: str) -> None:
        done = subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True, timeout=START_TIMEOUT + 30
        )
        if done.returncode != 0:
            raise PgUnavailable(f"{Path(argv[0]).name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")

    def start(self) -> None:
        """initdb and start; on any failure the temp dir is removed again."""
        try:
            self._as_postgres(
                str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-N", "-E", "UTF8"
            )
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write(SETTINGS.format(socket_dir=self.root))
            self._as_postgres(
                str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
                "-w", "-t", str(START_TIMEOUT), "start",
            )  # fmt: skip
        except BaseException as exc:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            self.remove()
            if isinstance(exc, PgUnavailable) and tail:
                raise PgUnavailable(f"{exc}\nserver log:\n{tail}") from None
            raise

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@/{dbname}?host={self.root}"

    def stop(self) -> None:
        """Stop at once (nothing in it is worth a clean shutdown) and remove every file."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._as_postgres(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


async def create_database(cluster: PgCluster) -> str:
    """A fresh, empty database in the cluster; returns its URL."""
    name = f"t_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(cluster.url("postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return cluster.url(name)


async def drop_database(cluster: PgCluster, url: str) -> None:
    """Drop the database of `url`, cutting any connection a failed test left open."""
    name = urlsplit(url).path.lstrip("/")
    admin = await asyncpg.connect(cluster.url("postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
