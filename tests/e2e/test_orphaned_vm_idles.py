"""A VM whose manager is gone (on_shutdown = "keep") idles like any idle VM, and is adopted back.

With the manager stopped, the host end of the guest agent's virtio-serial port is closed. The
agent must then wait for the host to come back instead of polling a port that reports hang-up
over and over; the VM's QEMU CPU time shows which it does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.e2e.guest import sandbox_run
from vmm.manager import VmManager
from vmm.model import VmState
from vmm.qemu import qemus_by_name
from vmm.settings import VmmSettings

WINDOW = 10.0  # seconds of CPU time measured with the manager present, then gone
# TCG makes an idle guest's ticks noisy (timer interrupts are emulated): allow twice the idle
# figure plus 0.5 s of CPU in 10 s. An agent polling a hung-up port costs most of a core instead.
SLACK_TICKS = 50


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


async def ticks_over(pid: int, seconds: float) -> int:
    before = cpu_ticks(pid)
    await asyncio.sleep(seconds)
    return cpu_ticks(pid) - before


async def test_a_vm_whose_manager_is_gone_idles_and_is_adopted_back(
    settings: VmmSettings, sandbox_template: str
) -> None:
    first = VmManager(settings)
    await first.start()
    try:
        vm = await first.create_vm(sandbox_template)
        assert vm.pid is not None
        pid = vm.pid
        assert await sandbox_run(vm.id, "x = 41; x") == 41
        present = await ticks_over(pid, WINDOW)
    finally:
        await first.close()  # on_shutdown "keep": the VM runs on, the host end of its agent port closes
    gone = await ticks_over(pid, WINDOW)
    assert gone <= 2 * present + SLACK_TICKS, f"{gone} ticks without a manager, {present} with one"

    second = VmManager(settings)
    await second.start()
    try:
        rec = second.get(vm.id)
        assert (rec.state, rec.pid) == (VmState.RUNNING, pid), "the same QEMU is adopted"
        ex = await second.exec(vm.id, ["python3", "-c", "print(6 * 7)"], [], "/", 1000, 1000)
        events = [event async for event in ex]
        assert [(e.kind, e.data, e.code) for e in events] == [("stdout", b"42\n", 0), ("exit", b"", 0)]
        assert await sandbox_run(vm.id, "x + 1") == 42
    finally:
        for each in list(second.list_vms()):
            await second.delete(each.id)
        await second.close()
    assert qemus_by_name().get(f"mvm-{vm.id}", []) == []
