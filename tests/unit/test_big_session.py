"""Benches of big sessions and wakes: the VM directory's measure (read while a suspend renames and removes
files), and the runtime's calls a wake's cost is split by."""

from __future__ import annotations

from pathlib import Path

from bench.big_session import _allocated, _allocated_file
from bench.wake_cost import RUNTIME_STEPS
from vmm.jail import Jailer
from vmm.runtime import QemuRuntime


def test_a_file_gone_since_it_was_listed_counts_nothing(tmp_path: Path) -> None:
    assert _allocated_file(tmp_path / "state.tmp") == 0  # renamed by the suspend between rglob and stat


def test_a_directory_counts_its_files_once_and_no_link(tmp_path: Path) -> None:
    (tmp_path / "ram").write_bytes(b"x" * 8192)
    (tmp_path / "link").symlink_to(tmp_path / "ram")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert _allocated(tmp_path) == _allocated_file(tmp_path / "ram") > 0


def test_wake_cost_measures_calls_the_runtime_has() -> None:
    """A step named after a call the runtime no longer makes would end `scale_bench --wake-cost` at its start."""
    assert [name for name, _ in RUNTIME_STEPS if not callable(getattr(QemuRuntime, name, None))] == []
    assert callable(getattr(Jailer, "spawn_vm", None))
