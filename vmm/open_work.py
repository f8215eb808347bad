"""Open work per VM: the one figure the idle reaper asks before it pauses or suspends a VM.

Open work is anything in progress for a VM: a proxied request or WebSocket, an exec, a shell,
a file transfer. It is counted where it runs:
- in this process, by whoever does it (`opened`/`closed`, or `hold` around it): the data
  plane of `mvm serve`, and the control API's exec, shell and files on the VM's host;
- in other processes (fleet edge workers), which report their own counts to the VM's host
  with every activity batch (`report`). A report replaces that reporter's last one and holds
  for a lease only, so the counts of an edge that crashed or lost its host expire.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

K = TypeVar("K")

MAX_LEASE = 60.0  # seconds a report may ask to be believed without being renewed


def count_down(counts: dict[K, int], key: K) -> None:
    """One fewer of `key`; a key at zero leaves the dict, so its size stays the live keys."""
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


@dataclass(frozen=True, slots=True)
class _Report:
    counts: dict[str, int]
    expires: float  # on this process's monotonic clock


class OpenWork(Mapping[str, int]):
    """VM id -> pieces of open work (only VMs with some are keys): held here plus reported, unexpired."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._here: dict[str, int] = {}
        self._reports: dict[str, _Report] = {}
        self._clock = clock

    def opened(self, vm_id: str) -> None:
        self._here[vm_id] = self._here.get(vm_id, 0) + 1

    def closed(self, vm_id: str) -> None:
        count_down(self._here, vm_id)

    @contextmanager
    def hold(self, vm_id: str) -> Iterator[None]:
        """Open work for the whole `with` block, however it ends."""
        self.opened(vm_id)
        try:
            yield
        finally:
            self.closed(vm_id)

    def report(self, reporter: str, counts: Mapping[str, int], lease: float) -> None:
        """`reporter`'s open work now, in place of what it reported before, believed for `lease` seconds."""
        live = {vm_id: n for vm_id, n in counts.items() if n > 0}
        if live:
            self._reports[reporter] = _Report(live, self._clock() + min(lease, MAX_LEASE))
        else:
            self._reports.pop(reporter, None)

    def _live_reports(self) -> list[dict[str, int]]:
        now = self._clock()
        for reporter in [r for r, report in self._reports.items() if report.expires <= now]:
            del self._reports[reporter]
        return [report.counts for report in self._reports.values()]

    def __getitem__(self, vm_id: str) -> int:
        total = self._here.get(vm_id, 0) + sum(counts.get(vm_id, 0) for counts in self._live_reports())
        if not total:
            raise KeyError(vm_id)
        return total

    def __iter__(self) -> Iterator[str]:
        keys = dict.fromkeys(self._here)
        for counts in self._live_reports():
            keys.update(dict.fromkeys(counts))
        return iter(keys)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"OpenWork({dict(self.items())!r})"
