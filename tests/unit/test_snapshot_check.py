import os
from pathlib import Path

import pytest

from vmm import faults, snapshot_check
from vmm.snapshot_check import SnapshotCorrupt


def test_a_changed_byte_anywhere_is_refused(tmp_path: Path) -> None:
    snap = tmp_path / "state"
    snap.write_bytes(os.urandom(100_000))
    snapshot_check.write(snap, snapshot_check.file_digest(snap))
    assert snapshot_check.verify(snap) is True
    good = snap.read_bytes()
    for offset in (0, 1, 50_000, 99_999):
        bad = bytearray(good)
        bad[offset] ^= 0x80
        snap.write_bytes(bytes(bad))
        with pytest.raises(SnapshotCorrupt, match="does not match its checksum"):
            snapshot_check.verify(snap)
    snap.write_bytes(good[:-1])
    with pytest.raises(SnapshotCorrupt):
        snapshot_check.verify(snap)


def test_a_snapshot_without_a_checksum_is_not_verified(tmp_path: Path) -> None:
    snap = tmp_path / "state"
    snap.write_bytes(b"older snapshot")
    assert snapshot_check.verify(snap) is False


def test_sparse_digest_reads_data_only_and_sees_changes_in_it(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    with ram.open("wb") as f:
        f.truncate(64 << 20)
        f.seek(8 << 20)
        f.write(b"guest page" * 400)
    first = snapshot_check.sparse_digest(ram)
    assert snapshot_check.sparse_digest(ram) == first
    with ram.open("r+b") as f:
        f.seek((8 << 20) + 5)
        f.write(b"X")
    assert snapshot_check.sparse_digest(ram) != first


def test_fault_points_do_nothing_until_armed() -> None:
    faults.point("unit.point")
    faults.arm("unit.point", "raise")
    try:
        with pytest.raises(OSError, match=r"fault injected at unit\.point"):
            faults.point("unit.point")
    finally:
        faults.disarm_all()
    with pytest.raises(ValueError, match="must be one of"):
        faults.arm("unit.point", "explode")
