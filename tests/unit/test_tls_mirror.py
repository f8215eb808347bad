"""The supervisor's copies of the edge's cluster files: owned by the worker user, readable by it alone,
copied again when a source changes (the key before the certificate), and what a worker of a set reads."""

import os
import pwd
from pathlib import Path

import pytest

from fleet.privilege import Identity
from fleet.run_dir import ENV
from fleet.settings import ClusterConfig
from fleet.tls_mirror import DIR, TlsMirror, mirrored


@pytest.fixture
def worker() -> Identity:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    entry = pwd.getpwnam("nobody")
    return Identity("nobody", entry.pw_uid, entry.pw_gid)


def _cluster(tmp_path: Path) -> ClusterConfig:
    files = tmp_path / "cluster"
    files.mkdir()
    for name, text in (("ca.crt", "ca 1"), ("edge.crt", "cert 1"), ("edge.key", "key 1")):
        (files / name).write_text(text)
        (files / name).chmod(0o600)
    return ClusterConfig(tls=True, ca_file=files / "ca.crt", edge_cert=files / "edge.crt", edge_key=files / "edge.key")


def test_copies_are_the_workers_and_follow_their_sources(tmp_path: Path, worker: Identity) -> None:
    cluster, run = _cluster(tmp_path), tmp_path / "run"
    run.mkdir()
    mirror = TlsMirror(cluster, run, worker)
    copies = run / DIR
    assert (copies.stat().st_uid, copies.stat().st_mode & 0o777) == (worker.uid, 0o700)
    for name, text in (("ca_file", "ca 1"), ("edge_cert", "cert 1"), ("edge_key", "key 1")):
        st = (copies / name).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (worker.uid, worker.gid, 0o400)
        assert (copies / name).read_text() == text

    replacement = tmp_path / "next.key"
    replacement.write_text("key 2")
    replacement.rename(cluster.edge_key)  # a rotation renames the new file over the old one
    mirror.refresh()
    assert (copies / "edge_key").read_text() == "key 2"
    assert (copies / "edge_cert").read_text() == "cert 1"
    assert sorted(p.name for p in copies.iterdir()) == ["ca_file", "edge_cert", "edge_key"], "no temporary left"


def test_a_worker_reads_the_copies_of_its_set_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = ClusterConfig(tls=True)
    monkeypatch.delenv(ENV, raising=False)
    assert mirrored(cluster) == cluster
    monkeypatch.setenv(ENV, str(tmp_path))
    assert mirrored(cluster) == cluster, "a set whose supervisor keeps no copies"
    (tmp_path / DIR).mkdir()
    got = mirrored(cluster)
    assert (got.ca_file, got.edge_cert, got.edge_key) == (tmp_path / DIR / "ca_file", tmp_path / DIR / "edge_cert",
                                                          tmp_path / DIR / "edge_key")  # fmt: skip
    assert got.host_key == cluster.host_key
