"""Busy VMs yield to quiet ones: a VM that has wanted most of its CPU quota for a while runs at a
small CPU weight until it calms down.

Quotas alone cannot protect a quiet VM: two neighbours each at their full quota of one vCPU take
both cores of a 2-core host, and with equal weights a quiet guest that wakes for a request gets
only its fair part of a core, so its answer takes twice as long. The scheduler gives a waking group
CPU in proportion to its weight, so lowering the weight of groups that have been busy for
`busy_after` seconds lets a quiet VM (and the host, whose weight is larger still) take a core
nearly at once, while the busy ones still get every cycle nobody else wants. It is the burstable
model of cloud instances: bursts run at full weight, sustained spinning at a low one.

What a VM wants is read per thread from /proc/<tid>/schedstat: time run plus time waiting on a run
queue. Time run alone would hide a spinner on a crowded host, where it gets less than it wants.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .cgroups import VM_CPU_WEIGHT, Cgroups
from .jsonlog import log
from .settings import JailSettings

INTERVAL = 1.0  # seconds between looks at the groups


def wanted_ns(tid: int) -> int | None:
    """Nanoseconds the thread has run or waited to run; None when it is gone."""
    try:
        with open(f"/proc/{tid}/schedstat") as stats:
            run, wait, _ = stats.read().split()
    except (OSError, ValueError):
        return None
    return int(run) + int(wait)


@dataclass
class _Seen:
    threads: dict[int, int] = field(default_factory=dict)  # tid -> its wanted_ns at the last look
    busy_since: float | None = None
    lowered: bool = False


class CpuFairness:
    """Looks at every VM group each interval and moves its CPU weight between normal and busy."""

    def __init__(
        self, groups: Cgroups, settings: JailSettings, clock: Callable[[], float] = time.monotonic,
        wanted: Callable[[int], int | None] = wanted_ns,
    ) -> None:  # fmt: skip
        self.groups = groups
        self.settings = settings
        self.clock = clock
        self.wanted = wanted
        self._seen: dict[str, _Seen] = {}
        self._at = clock()

    def lowered(self) -> set[str]:
        """The groups that run at the busy weight now."""
        return {group for group, seen in self._seen.items() if seen.lowered}

    def step(self) -> None:
        """One look at every group: the part of its quota its threads wanted since the last look."""
        now = self.clock()
        elapsed, self._at = now - self._at, now
        live = set(self.groups.groups())
        for gone in set(self._seen) - live:
            del self._seen[gone]
        for group in live:
            try:
                self._look(group, self._seen.setdefault(group, _Seen()), now, elapsed)
            except (OSError, ValueError):
                continue  # the group went between the listing and the reads

    def _look(self, group: str, seen: _Seen, now: float, elapsed: float) -> None:
        tids = self.groups.threads(group)
        if not tids:  # a group whose QEMU is gone (a suspended VM's, or one left behind): nothing to weigh
            seen.threads, seen.busy_since = {}, None
            return
        quota_cpus = self.groups.read_limits(group).cpu_quota_us / 100_000
        wanted = {tid: ns for tid in tids if (ns := self.wanted(tid)) is not None}
        delta = sum(ns - seen.threads[tid] for tid, ns in wanted.items() if tid in seen.threads)
        fresh, seen.threads = not seen.threads, wanted
        if fresh or elapsed <= 0:
            return
        share = delta / (elapsed * 1e9) / quota_cpus
        if share < self.settings.busy_share:
            seen.busy_since = None
        elif seen.busy_since is None:
            seen.busy_since = now - elapsed
        lowered = seen.busy_since is not None and now - seen.busy_since >= self.settings.busy_after
        weight = self.settings.busy_cpu_weight if lowered else VM_CPU_WEIGHT
        if self.groups.cpu_weight(group) != weight:  # also a group a restore remade, or an earlier process set
            self.groups.set_cpu_weight(group, weight)
            log.event("vm.cpu_busy" if lowered else "vm.cpu_calm", vm=group, cpu_weight=weight,
                      quota_share=round(share, 2))  # fmt: skip
        seen.lowered = lowered

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            self.step()
