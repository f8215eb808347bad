"""What one VM uses of the host: CPU and memory from its cgroup, disk from its files, network from its tap.

CPU % is the CPU time used between two reads over the wall time between them (100 is one whole
CPU), so the meter keeps each VM's last sample; the first read of a VM (or the first after its
QEMU was replaced, which starts its group's counters again) reports 0. A VM without a QEMU
(suspended) has no group: its CPU and memory read 0, its disk and network what they hold.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .cgroups import GroupUsage
from .vm_files import OVERLAY, RAM

NO_GROUP = GroupUsage(0, 0, 0, -1)


@dataclass(frozen=True)
class VmUsage:
    vm: str
    state: str
    at: float  # wall-clock time of the read
    cpu_seconds: float
    cpu_percent: float
    memory_bytes: int
    memory_peak_bytes: int
    memory_limit_bytes: int  # the group's memory limit; -1: none (or no group)
    disk_bytes: int  # allocated bytes of the VM's overlay and of its own RAM file
    net_rx_bytes: int  # the tap's counters, host side: rx is what the guest sent
    net_tx_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class UsageMeter:
    """Turns counters into usage, keeping the last CPU sample of each VM for its CPU %."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # VM id -> (clock, CPU ns)

    def cpu_percent(self, vm_id: str, cpu_ns: int) -> float:
        now = self._clock()
        last = self._last.get(vm_id)
        self._last[vm_id] = (now, cpu_ns)
        if last is None or cpu_ns < last[1] or now <= last[0]:
            return 0.0
        return round((cpu_ns - last[1]) / 1e9 / (now - last[0]) * 100, 1)

    def forget(self, vm_id: str) -> None:
        self._last.pop(vm_id, None)

    def read(
        self, vm_id: str, state: str, group: GroupUsage | None, vm_dir: Path, tap: tuple[int, int] | None
    ) -> VmUsage:
        """The VM's usage from its group's counters (None: no QEMU), its directory and its tap's counters."""
        if group is None:
            self.forget(vm_id)
            group, percent = NO_GROUP, 0.0
        else:
            percent = self.cpu_percent(vm_id, group.cpu_ns)
        rx, tx = tap or (0, 0)
        return VmUsage(
            vm_id, state, time.time(), round(group.cpu_ns / 1e9, 3), percent, group.memory_bytes,
            group.memory_peak_bytes, group.memory_limit_bytes, disk_bytes(vm_dir), rx, tx,
        )  # fmt: skip


def disk_bytes(vm_dir: Path) -> int:
    """Blocks the VM's own files hold on the host's disk (sparse files count what is written)."""
    total = 0
    for name in (OVERLAY, RAM):
        with contextlib.suppress(FileNotFoundError):
            total += (vm_dir / name).stat().st_blocks * 512
    return total
