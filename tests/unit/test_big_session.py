"""The big-session bench's measure of a VM's directory, which it reads while a suspend renames and removes files."""

from __future__ import annotations

from pathlib import Path

from bench.big_session import _allocated, _allocated_file


def test_a_file_gone_since_it_was_listed_counts_nothing(tmp_path: Path) -> None:
    assert _allocated_file(tmp_path / "state.tmp") == 0  # renamed by the suspend between rglob and stat


def test_a_directory_counts_its_files_once_and_no_link(tmp_path: Path) -> None:
    (tmp_path / "ram").write_bytes(b"x" * 8192)
    (tmp_path / "link").symlink_to(tmp_path / "ram")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert _allocated(tmp_path) == _allocated_file(tmp_path / "ram") > 0
