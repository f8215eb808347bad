"""Copies of the edge's cluster TLS files that workers who gave up root can read again after a rotation.

An edge worker drops to `server.worker_user` once its files are open, so it cannot re-read a key
file that only root may read, and a live rotation (cluster_tls.ClusterTls watches its files) would
leave it on the old certificate. The supervisor stays root: it copies the CA file and the edge's
certificate and key into its set's run directory, owned by the worker user and readable by it
alone, and copies each again when its source changes. Workers of a set take their cluster files
from there. A worker already holds the key in memory, so the copy gives it nothing it lacks.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from vmm.jsonlog import log

from .privilege import Identity
from .run_dir import ENV
from .settings import ClusterConfig

DIR = "cluster-tls"  # in the run directory
_FIELDS = ("ca_file", "edge_cert", "edge_key")


class TlsMirror:
    """The supervisor's side: the edge files of `cluster`, kept copied into `run_dir`/cluster-tls."""

    def __init__(self, cluster: ClusterConfig, run_dir: Path, owner: Identity) -> None:
        self.sources = {name: getattr(cluster, name) for name in _FIELDS}
        self.into = run_dir / DIR
        self.owner = owner
        self._seen: dict[str, tuple[int, int, int]] = {}
        self.into.mkdir(mode=0o700)
        os.chown(self.into, owner.uid, owner.gid)
        self.refresh()

    def refresh(self) -> None:
        """Copy every source whose inode, size or mtime changed since the last copy (the key first, so a
        worker that sees a new certificate finds its key there already)."""
        for name in sorted(_FIELDS, key=lambda n: n != "edge_key"):
            source = self.sources[name]
            try:
                st = source.stat()
                stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
                if self._seen.get(name) == stamp:
                    continue
                data = source.read_bytes()
            except OSError as exc:
                log.event("cluster.tls_mirror_failed", level="error", file=str(source), error=str(exc))
                continue
            _write_owned(self.into / name, data, self.owner)
            self._seen[name] = stamp


def mirrored(cluster: ClusterConfig) -> ClusterConfig:
    """A worker's cluster files: its set's copies when the supervisor keeps them, else the configured ones."""
    run = os.environ.get(ENV)
    if not run or not (Path(run) / DIR).is_dir():
        return cluster
    copies = Path(run) / DIR
    return replace(cluster, ca_file=copies / "ca_file", edge_cert=copies / "edge_cert", edge_key=copies / "edge_key")


def _write_owned(path: Path, data: bytes, owner: Identity) -> None:
    """Write `data` beside `path`, owned by `owner` and readable by it only, then rename it over `path`."""
    temporary = path.with_name(f".{path.name}.new")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
    try:
        os.fchown(fd, owner.uid, owner.gid)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(temporary, path)
