"""The run directory of one set of processes (`mvm serve`, `mvm edge --workers N`): what they share.

The supervisor makes it fresh before it starts any child and removes it when the set stops:
  - `connections`: open client connections per address, across the edge workers
    (`edge.shared_ips`), so `proxy.max_connections_per_ip` holds for the machine;
  - `metrics/`: prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR): every
    process of the set, the host included, writes its own values there, and `/metrics` on
    any worker answers the sum (`edge.metrics`);
  - `console-sessions/`: the web console's sign-ins (`edge.console`), one file each, so a
    session made by one worker is honoured, and ended, by every worker;
  - `upstreams.sock`: in `mvm serve`, the host's upstream broker (`fleet.upstream_broker`),
    through which workers that gave up root reach guests.
Workers that drop to `server.worker_user` own what they write here; the rest stays root's.
Children find it in their environment. It is made on tmpfs (/dev/shm) when there is one:
the files are mmap'd and written on every connection and request, and a state disk that
fills up must not SIGBUS a worker. A set whose supervisor was killed leaves its directory;
the next set started on this machine removes it.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import multiprocess

from edge.shared_ips import SharedIpTable, slots_for, start_time
from vmm.jsonlog import log

from .privilege import Identity

ENV = "MVM_RUN_DIR"
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own switch, read when it is imported
_PREFIX = "mvm-set-"
BROKER = "upstreams.sock"
SESSIONS = "console-sessions"


def _base() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def worker_nofile(wanted: int) -> int:
    """The most descriptors a worker will have: its soft limit after `raise_nofile_limit(wanted)`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    return max(soft, raised)


@dataclass
class RunDir:
    """The supervisor's handle on its set's directory."""

    path: Path
    table: SharedIpTable

    @classmethod
    def create(
        cls, workers: int, max_connections: int, base: Path | None = None, worker: Identity | None = None
    ) -> RunDir:
        """A fresh directory with a connection table of one region per worker.

        `worker`: the unprivileged identity the workers drop to; the files they write become theirs.
        """
        base = base or _base()
        _remove_orphans(base)
        path = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=base))
        try:
            (path / "metrics").mkdir()
            (path / SESSIONS).mkdir(mode=0o700)
            table = SharedIpTable.create(path / "connections", workers, slots_for(max_connections))
            if worker is not None:
                os.chown(path, -1, worker.gid)
                os.chmod(path, 0o750)
                for mine in (path / "metrics", path / "connections", path / SESSIONS):
                    os.chown(mine, worker.uid, worker.gid)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return cls(path, table)

    @property
    def metrics_dir(self) -> Path:
        return self.path / "metrics"

    def env(self) -> dict[str, str]:
        """The children's environment: where the set's files are."""
        return {**os.environ, ENV: str(self.path), METRICS_ENV: str(self.metrics_dir)}

    def forget(self, pid: int) -> None:
        """A child ended: its open connections are gone, and so are its live gauges."""
        if self.table.forget(pid):
            log.event("fleet.worker_connections_cleared", pid=pid)
        multiprocess.mark_process_dead(pid, str(self.metrics_dir))

    def remove(self) -> None:
        self.table.close()
        shutil.rmtree(self.path, ignore_errors=True)


def _remove_orphans(base: Path) -> None:
    """Directories of sets whose supervisor is gone (killed before it could remove its own)."""
    for path in base.glob(f"{_PREFIX}*"):
        pid = path.name[len(_PREFIX) :].split("-")[0]
        try:
            owned = path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if owned and pid.isdigit() and start_time(int(pid)) is None:
            shutil.rmtree(path, ignore_errors=True)


def broker_path() -> Path | None:
    """Where this set's host hands out upstream connections (fleet.upstream_broker); None outside a set."""
    run = os.environ.get(ENV)
    return Path(run) / BROKER if run else None


def console_sessions_dir() -> Path | None:
    """Where this set's workers keep the web console's sessions (any worker serves any); None outside a set."""
    run = os.environ.get(ENV)
    return Path(run) / SESSIONS if run else None


def join_table(pid: int) -> SharedIpTable | None:
    """A worker's region in its set's connection table, or None when it runs alone (no set)."""
    run = os.environ.get(ENV)
    if not run:
        return None
    metrics_dir = os.environ.get(METRICS_ENV)
    table = SharedIpTable(Path(run) / "connections")
    if metrics_dir:
        claimed = table.claim(pid, lambda dead: multiprocess.mark_process_dead(dead, metrics_dir))
    else:
        claimed = table.claim(pid)
    if not claimed:
        log.event("edge.connections_table_taken", level="error", path=str(table.path), regions=table.regions,
                  detail="every region has a live worker: this one counts its own connections only")  # fmt: skip
        table.close()
        return None
    return table
