"""Where an operation's time goes: the wall and manager-CPU milliseconds of each of its steps, for its
log event (a checkpoint's pause, a fork child's start). bench/fork_bench.py reads them from the log."""

from __future__ import annotations

import time


class Phases:
    """Milliseconds per named step, each measured from the end of the one before."""

    def __init__(self) -> None:
        self.wall_ms: dict[str, float] = {}
        self.cpu_ms: dict[str, float] = {}
        self._wall = time.monotonic()
        self._cpu = time.process_time()

    def mark(self, step: str) -> None:
        """`step` ended now."""
        wall, cpu = time.monotonic(), time.process_time()
        self.wall_ms[step] = round((wall - self._wall) * 1000, 1)
        self.cpu_ms[step] = round((cpu - self._cpu) * 1000, 1)
        self._wall, self._cpu = wall, cpu

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {"wall_ms": dict(self.wall_ms), "manager_cpu_ms": dict(self.cpu_ms)}
