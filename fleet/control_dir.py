"""An edge worker's private directory for its control socket, named by its pid.

A worker that stops removes its own; one that is killed cannot. So each worker, before it makes
its own, removes those of workers of the same user whose pid no longer runs: a killed worker's
directory lives until the next worker starts, not forever.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "mvm-edge-control-"


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        pass
    return True


def sweep(root: Path) -> list[Path]:
    """Remove this user's control directories under `root` whose worker no longer runs."""
    removed = []
    for path in root.glob(f"{PREFIX}*-*"):
        pid_text = path.name.removeprefix(PREFIX).split("-", 1)[0]
        with contextlib.suppress(OSError):
            if not pid_text.isdigit() or path.is_symlink() or path.stat().st_uid != os.geteuid():
                continue
            if not _pid_runs(int(pid_text)):
                shutil.rmtree(path)
                removed.append(path)
    return removed


def make() -> tempfile.TemporaryDirectory[str]:
    """This worker's directory (0700), after sweeping the dead workers' ones."""
    sweep(Path(tempfile.gettempdir()))
    return tempfile.TemporaryDirectory(prefix=f"{PREFIX}{os.getpid()}-")
