"""Where one wake's CPU goes (issue 17, `scale_bench --wake-cost N`): N suspended VMs woken one after another,
each wake split into its steps, with the CPU of the manager's process (and the children it reaped: `ip`, the
jail helper) and of the VM's QEMU (/proc/<pid>/stat) measured around each step.

Steps are timed by wrapping the runtime's calls for the wake's VM (the manager runs as in production); QEMU's
CPU is counted in clock ticks (10 ms), so a step's share is its sum over the N wakes, divided by N.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from vmm import probe
from vmm import runtime as runtime_module
from vmm.image import load_image
from vmm.live import LiveVm
from vmm.manager import VmManager

from .proc_cpu import cpu_seconds, own_cpu_seconds
from .stats import table

WAKE = "the wake: the steps above and the manager between them"
FIRST_REQUEST = "first request (GET in the namespace: TCG translates the guest's code anew)"


def _qemu_cpu(vm: LiveVm | None) -> float:
    return cpu_seconds(vm.proc.pid, children=False) if vm is not None and vm.proc is not None else 0.0


class Steps:
    """Wall, host CPU and QEMU CPU summed per step, for the VM being woken (`current`)."""

    def __init__(self) -> None:
        self.current: LiveVm | None = None
        self.sums: dict[str, list[float]] = {}
        self._wrapped: list[tuple[Any, str, Any]] = []

    async def measure(self, step: str, action: Callable[[], Awaitable[Any]]) -> Any:
        vm = self.current
        pid = vm.proc.pid if vm is not None and vm.proc is not None else None
        wall, host, qemu = time.perf_counter(), own_cpu_seconds(), _qemu_cpu(vm)
        try:
            return await action()
        finally:
            same = vm is not None and vm.proc is not None and vm.proc.pid == pid
            spent = _qemu_cpu(vm) - (qemu if same else 0.0)
            row = self.sums.setdefault(step, [0.0, 0.0, 0.0])
            row[0] += time.perf_counter() - wall
            row[1] += own_cpu_seconds() - host
            row[2] += spent

    def wrap(self, owner: Any, name: str, step: str) -> None:
        """`owner.name` measured as `step` while a wake is under way, untouched otherwise."""
        real = getattr(owner, name)
        self._wrapped.append((owner, name, real))

        @functools.wraps(real)
        async def measured(*args: Any, **kwargs: Any) -> Any:
            if self.current is None:
                return await real(*args, **kwargs)
            return await self.measure(step, lambda: real(*args, **kwargs))

        setattr(owner, name, measured)

    def unwrap(self) -> None:
        for owner, name, real in reversed(self._wrapped):
            setattr(owner, name, real)
        self._wrapped.clear()


# The runtime's calls a wake makes, by step: (the runtime's method, the step's name).
RUNTIME_STEPS = (
    ("provision", "namespace and tap (ip), cgroup (a thread)"),
    ("open_egress", "egress proxy"),
    ("command", "QMP cont"),
    ("open_console", "app console"),
    ("connect_agent", "agent connect"),
    ("sync_guest", "agent sync (clock, entropy, hostname)"),
)


def _instrument(manager: VmManager, steps: Steps) -> None:
    runtime = manager.runtime
    for name, step in RUNTIME_STEPS:
        steps.wrap(runtime, name, step)
    steps.wrap(runtime.jail, "spawn_vm", "spawn (jail helper joining the cgroup, QEMU exec)")  # type: ignore[attr-defined]
    steps.wrap(runtime_module.qmp_ops, "connect", "QEMU start-up until QMP answers")
    steps.wrap(runtime_module.qmp_ops, "load", "device-state load")


async def wake_cost(manager: VmManager, template: str, image: str, count: int) -> str:
    """`count` VMs of `template` made, suspended, then woken one at a time; the table of steps per wake."""
    ready = load_image(manager.settings.images_dir, image).ready
    ids = []
    for _ in range(count):
        rec = await manager.create_vm(template)
        await probe.wait_ready(rec.id, ready, 120.0, lambda: True)
        await manager.suspend(rec.id)
        ids.append(rec.id)
    steps = Steps()
    _instrument(manager, steps)
    total = [0.0, 0.0, 0.0]
    try:
        for vm_id in ids:
            steps.current = vm = manager.records.get(vm_id)
            wall, host = time.perf_counter(), own_cpu_seconds()
            await steps.measure(WAKE, functools.partial(manager.ensure_running, vm_id))
            await steps.measure(FIRST_REQUEST, functools.partial(probe.wait_ready, vm_id, ready, 60.0, lambda: True))
            host_cpu = own_cpu_seconds() - host
            total = [total[0] + time.perf_counter() - wall, total[1] + host_cpu, total[2] + _qemu_cpu(vm)]
            steps.current = None
    finally:
        steps.current = None
        steps.unwrap()
        for vm_id in ids:
            await manager.delete(vm_id)
    rows = [[step, *(f"{value / count * 1000:.1f}" for value in sums)] for step, sums in steps.sums.items()]
    rows.append(["**wake -> first answer**", *(f"{value / count * 1000:.1f}" for value in total)])
    return table([f"one wake of a {template} VM ({count} one after another), per wake", "wall ms",
                  "host CPU ms (manager + children)", "QEMU CPU ms"], rows)  # fmt: skip
