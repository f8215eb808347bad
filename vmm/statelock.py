"""One manager per state directory: an exclusive flock on `<state_dir>/manager.lock` that names its holder.

A second manager on the same directory would take the first one's VMs for dead. `mvm serve`
takes the lock before it starts anything (so a second `mvm serve` stops before any of its
processes opens the port) and hands the locked descriptor to its host process, which adopts
it: the lock is then held for as long as either of them runs.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import Conflict, VmmError

LOCK_FILE = "manager.lock"


def take(state_dir: Path) -> int:
    """Lock `state_dir` for this process and write its pid there; Conflict naming the holder if taken."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise VmmError(f"cannot lock state directory {state_dir}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise Conflict(
            f"state directory {state_dir} is in use by pid {holder} (is `mvm serve` already running?); "
            "one manager per state directory"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def adopt(state_dir: Path, fd: int) -> int:
    """The lock `mvm serve` took for its host process, inherited as `fd`: checked to be this directory's."""
    try:
        held, expected = os.fstat(fd), os.stat(state_dir / LOCK_FILE)
        if (held.st_dev, held.st_ino) != (expected.st_dev, expected.st_ino):
            raise VmmError(f"descriptor {fd} is not the lock of state directory {state_dir}")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the same open file as the parent's: already ours
    except OSError as exc:
        raise VmmError(f"cannot adopt the lock of state directory {state_dir} (descriptor {fd}): {exc}") from exc
    os.set_inheritable(fd, False)  # never passed on to QEMU: the lock must end with the manager
    return fd
