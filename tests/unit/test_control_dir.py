"""A killed edge worker's control directory is removed by the next worker's start, a live one's never."""

import os
import subprocess
from pathlib import Path

from fleet import control_dir


def test_dead_workers_directories_go_live_ones_stay(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = tmp_path / f"{control_dir.PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{control_dir.PREFIX}{os.getpid()}-def"
    unnamed = tmp_path / f"{control_dir.PREFIX}xyz"  # not one of ours: no pid in its name
    for path in (gone, live, unnamed):
        path.mkdir()
        (path / "control.sock").touch()
    assert control_dir.sweep(tmp_path) == [gone]
    assert not gone.exists() and live.exists() and unnamed.exists()


def test_the_directory_names_its_worker() -> None:
    made = control_dir.make()
    try:
        assert Path(made.name).name.startswith(f"{control_dir.PREFIX}{os.getpid()}-")
        assert Path(made.name).stat().st_mode & 0o777 == 0o700
    finally:
        made.cleanup()
