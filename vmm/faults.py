"""Named fault points, so crash and failure tests hit an exact step instead of a timing window.

A point does nothing unless armed. Tests arm points in-process (`arm`) or, for a manager
running in another process, through the environment: `MVM_FAULTS="restore.loaded=kill"`
(comma-separated `point=action`). Actions: `kill` sends SIGKILL to this process (a crash
at that step), `raise` raises FaultInjected (a failing step, e.g. a registry write).
"""

from __future__ import annotations

import os
import signal

ENV = "MVM_FAULTS"
ACTIONS = ("kill", "raise")

_armed: dict[str, str] = {}


class FaultInjected(OSError):
    """The failure a `raise` point injects: an OSError, like the disk or database error it stands for."""


def _from_env() -> dict[str, str]:
    armed = {}
    for item in filter(None, (part.strip() for part in os.environ.get(ENV, "").split(","))):
        point, _, action = item.partition("=")
        if action not in ACTIONS:
            raise ValueError(f"{ENV}: {item!r}: the action must be one of {', '.join(ACTIONS)}")
        armed[point] = action
    return armed


def arm(point: str, action: str) -> None:
    if action not in ACTIONS:
        raise ValueError(f"fault action must be one of {', '.join(ACTIONS)}, got {action!r}")
    _armed[point] = action


def disarm_all() -> None:
    _armed.clear()


def point(name: str) -> None:
    """A step where a crash or a failure can be injected."""
    action = _armed.get(name)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise FaultInjected(f"fault injected at {name}")


_armed.update(_from_env())
