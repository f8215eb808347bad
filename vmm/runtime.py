"""The runtime of a VM: its QEMU process (spawn, QMP, exit), its guest agent and console, and its
network services (namespace and egress proxy).

Transitions (vmm.transitions, vmm.snapshots, vmm.recovery) decide; the runtime acts. `Runtime`
is all they call, so a fake stands in for it in unit tests (no QEMU, no namespaces).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Protocol

from qemu.qmp.error import QMPError

from . import disks, faults, snapshot_check, template
from . import qmp as qmp_ops
from .accel import Accelerator
from .agent import Agent, AgentError, load_key
from .applog import AppLog
from .cgroups import GroupUsage
from .console import ConsoleReader
from .cpu_fairness import CpuFairness
from .errors import RegistryError, VmFailed, VmmError
from .jail import Jailer, kvm_groups
from .jsonlog import log
from .live import LiveVm
from .model import Template
from .network import netns
from .network.egress import EgressServer
from .phases import Phases
from .qemu import (
    AGENT_SOCKET,
    APP_CONSOLE,
    QEMU_LOG,
    QMP_SOCKET,
    DiskBacking,
    QemuProcess,
    RamBacking,
    describe_exit,
    kill_pid,
    qemus_by_name,
    start_ticks,
)
from .records import RecordStore
from .registry import ProcessIntent
from .settings import VmmSettings
from .vm_files import AGENT_KEY, OVERLAY

QMP_CONNECT_TIMEOUT = 10.0
SYNC_SKEW_MS = 5.0  # a guest clock further off than this after a sync is synced once more

# Called under the VM's lock when its QEMU ended without being asked to, with the reason.
OnLost = Callable[[LiveVm, str], Awaitable[None]]


class Runtime(Protocol):
    """What the transitions need done to a VM's processes and network (vmm.runtime.QemuRuntime)."""

    settings: VmmSettings

    async def load(
        self, vm: LiveVm, tpl: Template, ram: RamBacking, snapshot: Path, ignore_shared: bool, purpose: str,
        on_lost: OnLost, phases: Phases | None = None,
    ) -> None: ...  # fmt: skip
    async def command(self, vm: LiveVm, command: str) -> None: ...
    async def save(self, vm: LiveVm, path: Path, ignore_shared: bool) -> int: ...
    async def stop(self, vm: LiveVm, why: str = "the VM's QEMU stopped") -> None: ...
    async def let_go(self, vm: LiveVm) -> None: ...
    def alive(self, vm: LiveVm) -> bool: ...
    def exit_reason(self, vm: LiveVm, during: str = "") -> str: ...
    async def guest_runs(self, vm: LiveVm) -> bool: ...
    async def open_console(self, vm: LiveVm, app_log: AppLog) -> None: ...
    async def connect_agent(self, vm: LiveVm) -> None: ...
    async def sync_guest(self, vm: LiveVm) -> None: ...
    def private_dirty(self, vm: LiveVm, mapped: Path) -> int: ...
    def group_usage(self, vm_id: str) -> GroupUsage | None: ...
    def tap_bytes(self, vm_id: str) -> tuple[int, int] | None: ...
    def running_qemus(self) -> dict[str, list[int]]: ...
    async def kill_strays(self, vm_id: str, keep: int | None, found: list[int]) -> None: ...
    async def adopt(self, vm: LiveVm, pid: int, on_lost: OnLost) -> str | None: ...
    async def provision(self, vm: LiveVm, tpl: Template) -> None: ...
    def network_exists(self, vm_id: str) -> bool: ...
    async def delete_network(self, vm_id: str) -> None: ...
    async def cut(self, vm_id: str) -> None: ...
    async def uncut(self, vm_id: str) -> None: ...
    async def open_egress(self, vm: LiveVm) -> None: ...
    async def close_egress(self, vm_id: str) -> None: ...
    def prepare_confinement(self) -> None: ...
    async def release_confinement(self, vm_id: str) -> None: ...
    async def balance_cpu_forever(self) -> None: ...
    def release_group(self, vm_id: str) -> None: ...
    async def sweep_groups(self, gone: Iterable[str]) -> None: ...


class QemuRuntime:
    """Runtime over real QEMU processes (vmm.qemu), QMP, the guest agent and vmm.network.netns."""

    def __init__(
        self, settings: VmmSettings, accel: Accelerator, records: RecordStore, egress: EgressServer | None
    ) -> None:
        self.settings = settings
        self.accel = accel
        self.records = records
        self.egress = egress  # serves each running VM's egress proxy (the edge's); None: guests have none
        self.jail = Jailer(settings)  # every QEMU confined and limited (vmm/jail.py, vmm/cgroups.py)

    def _vm_dir(self, vm_id: str) -> Path:
        return self.settings.vms_dir / vm_id

    # ---- QEMU ----------------------------------------------------------------------------

    async def load(
        self, vm: LiveVm, tpl: Template, ram: RamBacking, snapshot: Path, ignore_shared: bool, purpose: str,
        on_lost: OnLost, phases: Phases | None = None,
    ) -> None:  # fmt: skip
        """Spawn QEMU waiting for a migration and load `snapshot`; the guest stays stopped (`phases`: the
        spawn, QEMU's start until its QMP answers, and the load, each timed).

        The process is in the registry before anything depends on it, so a manager that dies
        from here on leaves nothing a restart cannot find.
        """
        vm_id = vm.rec.id
        vm_dir = self._vm_dir(vm_id)
        if purpose == "launch":
            snapshot_check.verify(snapshot)
        spec = template.machine_spec(tpl, f"mvm-{vm_id}", self.accel)
        sock = vm_dir / QMP_SOCKET
        sock.unlink(missing_ok=True)
        disk = DiskBacking(vm_dir / OVERLAY, "qcow2") if spec.has_disk else None
        vm.expect_exit = vm.guest_ran = False
        chain = disks.trusted_chain(disk.path, vm_id, tpl.base_disk, self.settings.vms_dir) if disk is not None else []
        read_only = _outside((vm_dir, Path(tpl.path)), ram.path, *chain)
        proc = await self.jail.spawn_vm(vm.rec, tpl, spec, ram, disk, vm_dir, self._watch(vm, on_lost), read_only)
        vm.proc = proc
        try:
            self.records.add_process(ProcessIntent(proc.pid, vm_id, proc.start_ticks, purpose))
            if purpose != "ram-move":
                vm.rec.pid = proc.pid  # the process that runs the guest, adopted after a restart
                self.records.write(vm.rec)
        except (sqlite3.Error, OSError) as exc:
            await self.stop(vm)
            raise RegistryError(f"could not record VM {vm_id}'s QEMU in the registry: {exc}") from exc
        faults.point(f"{purpose}.spawned")
        steps = phases or Phases()
        steps.mark("spawn")
        try:
            vm.qmp = await qmp_ops.connect(sock, spec.name, QMP_CONNECT_TIMEOUT, lambda: proc.alive)
            steps.mark("qemu_start")
            await qmp_ops.load(vm.qmp, snapshot, ignore_shared, self.settings.restore_timeout, proc.exited)
            steps.mark("incoming_load")
        except VmmError as exc:
            why = f" ({describe_exit(proc.exit_status)})" if not proc.alive else ""
            raise VmmError(f"{exc}{why}{self.qemu_log_tail(vm_id)}") from exc
        faults.point(f"{purpose}.loaded")

    async def command(self, vm: LiveVm, command: str) -> None:
        """A QMP command without arguments (stop, cont)."""
        if vm.qmp is None:
            raise VmFailed(f"VM {vm.rec.id} has no running QEMU")
        try:
            await vm.qmp.execute(command)
        except (QMPError, OSError) as exc:
            raise VmFailed(f"QMP {command} on VM {vm.rec.id} failed: {exc}") from exc

    async def save(self, vm: LiveVm, path: Path, ignore_shared: bool) -> int:
        """The stopped guest's device state (and RAM, unless shared) to `path`; its size."""
        assert vm.qmp is not None and vm.proc is not None
        return await qmp_ops.save(vm.qmp, path, ignore_shared, self.settings.restore_timeout, vm.proc.exited)

    async def stop(self, vm: LiveVm, why: str = "the VM's QEMU stopped") -> None:
        """End the VM's QEMU and everything connected to it; each part only if it is there."""
        vm.expect_exit = True
        if vm.agent is not None:
            await vm.agent.close(why)
            vm.agent = None
        if vm.qmp is not None:
            await vm.qmp.disconnect_quietly()
            vm.qmp = None
        if vm.proc is not None:
            await vm.proc.kill()
            self.records.forget_process(vm.proc.pid)
            vm.proc = None
        if vm.console is not None:
            await vm.console.close(drain=True)  # QEMU has ended: its last bytes (an app's dying words) are kept
            vm.console = None
        vm.rec.pid = None

    async def let_go(self, vm: LiveVm) -> None:
        """The manager stops: its connections to the VM's QEMU close, the QEMU runs on (re-adopted later)."""
        if vm.qmp is not None:
            await vm.qmp.disconnect_quietly()
        if vm.agent is not None:
            await vm.agent.close("the manager stopped")
        if vm.console is not None:
            await vm.console.close(drain=False)
        if vm.proc is not None:
            vm.proc.close()

    def alive(self, vm: LiveVm) -> bool:
        return vm.proc is not None and vm.proc.alive

    def exit_reason(self, vm: LiveVm, during: str = "") -> str:
        """How the VM's QEMU ended (`during` what), with the last line of its log."""
        status = vm.proc.exit_status if vm.proc is not None else None
        return f"{describe_exit(status)}{during}{self.qemu_log_tail(vm.rec.id)}"

    async def guest_runs(self, vm: LiveVm) -> bool:
        """After a restore step failed past `cont`: does the guest run on in a live QEMU?"""
        if vm.qmp is None or vm.proc is None or not vm.proc.alive:
            return False
        try:
            async with asyncio.timeout(QMP_CONNECT_TIMEOUT):
                return await qmp_ops.status(vm.qmp) == "running"
        except (QMPError, OSError, TimeoutError):
            return False

    def qemu_log_tail(self, vm_id: str) -> str:
        try:
            lines = (self._vm_dir(vm_id) / QEMU_LOG).read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return ""
        return f" (qemu: {lines[-1]})" if lines else ""

    def _watch(self, vm: LiveVm, on_lost: OnLost) -> Callable[[QemuProcess, int | None], None]:
        """QEMU ended: settled under the VM's lock, after any transition that is watching it.
        If nobody asked it to end, `on_lost` gets the reason."""

        async def settle(proc: QemuProcess, status: int | None) -> None:
            async with vm.lock:
                if vm.proc is not proc or vm.expect_exit:
                    return
                guest_tail = template.guest_log_tail(self._vm_dir(vm.rec.id), 3)
                reason = f"{describe_exit(status)}{self.qemu_log_tail(vm.rec.id)}{guest_tail}"
                await on_lost(vm, self.jail.oom_reason(vm.rec.id) or reason)

        def on_exit(proc: QemuProcess, status: int | None) -> None:
            asyncio.get_running_loop().create_task(settle(proc, status))

        return on_exit

    # ---- confinement ---------------------------------------------------------------------

    def prepare_confinement(self) -> None:
        """Check the host's set-up for jails and limits, and make the cgroup tree (at start)."""
        self.jail.start()
        if self.settings.jail.enabled and self.accel.name == "kvm":
            kvm_groups()  # a /dev/kvm the jailed QEMU could not open is refused now, not at the first launch

    async def release_confinement(self, vm_id: str) -> None:
        """The VM is gone: its uid goes back to the pool and its cgroup away."""
        await self.jail.release(vm_id, self._vm_dir(vm_id))

    async def balance_cpu_forever(self) -> None:
        """Busy VMs run at a lower CPU weight than quiet ones (vmm/cpu_fairness.py); nothing without limits."""
        if self.jail.cgroups is not None and self.settings.jail.busy_cpu_weight > 0:
            await CpuFairness(self.jail.cgroups, self.settings.jail).run_forever()

    def release_group(self, vm_id: str) -> None:
        """A suspended VM has no QEMU: its cgroup goes (made afresh at the next spawn), its uid stays."""
        self.jail.remove_group(vm_id)

    async def sweep_groups(self, gone: Iterable[str]) -> None:
        """The cgroups of `gone` (VMs failed, or known gone at start) and any other this state directory
        left without a task (a QEMU killed while busy outlives its VM's release)."""
        await self.jail.sweep(gone)

    def private_dirty(self, vm: LiveVm, mapped: Path) -> int:
        """Bytes the VM's QEMU has written to its private (copy-on-write) mapping of `mapped`."""
        if vm.proc is None:
            return 0
        try:
            smaps = Path(f"/proc/{vm.proc.pid}/smaps").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return 0
        total, inside, name = 0, False, str(mapped.resolve())
        for line in smaps.splitlines():
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line: "start-end perms ... path"
                inside = line.endswith(name)
            elif inside and first == "Private_Dirty:":
                total += int(line.split()[1]) * 1024
        return total

    def group_usage(self, vm_id: str) -> GroupUsage | None:
        """The counters of the VM's cgroup; None without limits or when it has no group."""
        groups = self.jail.cgroups
        if groups is None:
            return None
        try:
            return groups.usage(vm_id)
        except (OSError, ValueError):
            return None

    def tap_bytes(self, vm_id: str) -> tuple[int, int] | None:
        return netns.tap_bytes(vm_id)

    def running_qemus(self) -> dict[str, list[int]]:
        return qemus_by_name()

    async def kill_strays(self, vm_id: str, keep: int | None, found: list[int]) -> None:
        """End every QEMU of the VM except `keep`: those running under its name, and those the
        registry recorded (if their start time says they are still the same processes)."""
        intents = self.records.processes(vm_id)
        pids = set(found) | {i.pid for i in intents if start_ticks(i.pid) == i.start_ticks}
        purposes = {i.pid: i.purpose for i in intents}
        for pid in sorted(pids - {keep} if keep is not None else pids):
            await kill_pid(pid)
            log.event("vm.orphan_killed", level="warning", vm=vm_id, pid=pid, purpose=purposes.get(pid, "unknown"))
        for intent in intents:
            if intent.pid != keep:
                self.records.forget_process(intent.pid)

    async def adopt(self, vm: LiveVm, pid: int, on_lost: OnLost) -> str | None:
        """Re-attach to the QEMU an earlier manager left running: its run state, or None if it is not ours."""
        proc = QemuProcess.adopt(pid, f"mvm-{vm.rec.id}", self._watch(vm, on_lost))
        if proc is None:
            return None
        vm.proc = proc
        try:
            sock = self._vm_dir(vm.rec.id) / QMP_SOCKET
            vm.qmp = await qmp_ops.connect(sock, f"mvm-{vm.rec.id}", QMP_CONNECT_TIMEOUT, lambda: proc.alive)
            return await qmp_ops.status(vm.qmp)
        except (VmmError, QMPError, OSError, TimeoutError):
            return None

    # ---- the guest agent and the app's console (disk images) -----------------------------

    async def open_console(self, vm: LiveVm, app_log: AppLog) -> None:
        vm.console = await ConsoleReader.open(vm.rec.id, self._vm_dir(vm.rec.id) / APP_CONSOLE, app_log)

    async def connect_agent(self, vm: LiveVm) -> None:
        try:
            vm_dir = self._vm_dir(vm.rec.id)
            vm.agent = await Agent.connect(vm_dir / AGENT_SOCKET, load_key(vm_dir / AGENT_KEY))
        except (AgentError, OSError) as exc:  # the guest runs on without it: exec says so
            log.event("vm.agent_unavailable", level="warning", vm=vm.rec.id, error=str(exc))

    async def sync_guest(self, vm: LiveVm) -> None:
        """Before any held request is released: the host's wall clock, fresh entropy, the VM id as hostname.

        Every clone of a snapshot wakes with the snapshot's clock and RNG state. A guest whose
        agent does not answer keeps working: the step is logged and skipped, never waited on (a
        guest that must not run on without fresh entropy is synced again by vmm.own_key).
        """
        if vm.agent is None or not self.settings.guest_sync:
            return
        try:
            result = await vm.agent.sync(vm.rec.id, self.settings.agent_timeout)
            if abs(result.skew_ms) > SYNC_SKEW_MS:
                # The first answer after a restore is slow (cold guest code), so the clock it set is
                # behind by that delay; a second sync, warm, lands within a millisecond.
                result = await vm.agent.sync(vm.rec.id, self.settings.agent_timeout)
        except AgentError as exc:
            log.event("vm.sync_failed", level="warning", vm=vm.rec.id, error=str(exc))
            return
        log.event("vm.synced", level="debug", vm=vm.rec.id, ms=round(result.took_ms, 1),
                  skew_ms=round(result.skew_ms, 1), reseeded=result.crng_reseeded)  # fmt: skip

    # ---- network services: the VM's namespace and egress proxy ---------------------------

    async def provision(self, vm: LiveVm, tpl: Template) -> None:
        """What the VM's QEMU needs on the host before it starts: a fresh namespace and its cgroup with its
        limits, made side by side (the cgroup in a thread, while the namespace's commands run); if either
        fails, neither is left."""
        vm_id = vm.rec.id
        try:
            made = await asyncio.gather(
                netns.create(vm_id), self.jail.prepare_group(vm.rec, tpl), return_exceptions=True
            )
        except asyncio.CancelledError:  # gather let both steps end first: undo what they made
            await self._unprovision(vm_id)
            raise
        failed = next((r for r in made if isinstance(r, BaseException)), None)
        if failed is not None:
            await self._unprovision(vm_id)
            raise failed

    async def _unprovision(self, vm_id: str) -> None:
        self.jail.remove_group(vm_id)
        with contextlib.suppress(VmmError, OSError):
            await netns.delete(vm_id)

    def network_exists(self, vm_id: str) -> bool:
        return netns.exists(vm_id)

    async def delete_network(self, vm_id: str) -> None:
        await netns.delete(vm_id)

    async def cut(self, vm_id: str) -> None:
        """Every connection to the guest cut, new ones unroutable (vmm.network.netns.cut_guest)."""
        await netns.cut_guest(vm_id)

    async def uncut(self, vm_id: str) -> None:
        await netns.uncut_guest(vm_id)

    async def open_egress(self, vm: LiveVm) -> None:
        """The VM's egress proxy, listening in its namespace before the guest runs (again)."""
        if self.egress is None:
            return
        try:
            await self.egress.open(vm.rec.id, vm.rec.policy.egress)
        except (OSError, VmmError) as exc:  # the guest runs on without a way out, as with egress "none"
            log.event("vm.egress_unavailable", level="error", vm=vm.rec.id, error=str(exc))

    async def close_egress(self, vm_id: str) -> None:
        if self.egress is not None:
            await self.egress.close(vm_id)


def _outside(bound: tuple[Path, ...], *files: Path) -> tuple[Path, ...]:
    """The directories of `files` not under the `bound` ones (the VM's own and its template's, in its jail
    already): another VM's checkpoint it maps RAM from or reads its disk through."""
    roots = [b.resolve() for b in bound]
    dirs = {f.parent.resolve() for f in files}
    return tuple(sorted(d for d in dirs if not any(d == r or r in d.parents for r in roots)))
