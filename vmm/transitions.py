"""The moves of one VM other than its snapshots: launch, pause, wake, delete, and a QEMU lost.

Every method is called with the VM's lock held, and every state change goes through the
lifecycle (vmm.lifecycle.Lifecycle), so each one is checked against its one table.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import capacity, disks, reflink, template
from .agent import copy_key
from .applog import AppLog
from .errors import Conflict, InvalidRequest, NotRunning, VmFailed, VmmError
from .hook_runner import run_hook
from .jsonlog import log
from .lifecycle import Lifecycle
from .live import LiveVm
from .model import RamMode, Template, VmRecord, VmState
from .own_key import take_own_key
from .policy import Policy
from .qemu import APP_LOG, RamBacking
from .records import RecordStore
from .runtime import Runtime
from .settings import VmmSettings
from .snapshots import Snapshots
from .undo import Undo
from .vm_files import AGENT_KEY, CHECKPOINTS, OVERLAY, RAM, STATE, app_log

_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


def new_vm(
    settings: VmmSettings, template_name: str | None, policy: dict[str, Any] | None
) -> tuple[Template, VmRecord]:
    """The template and the pending record of a VM to launch, if the template fits its policy and this host."""
    tpl = template.load(settings, template_name or settings.default_template)
    pol = Policy.from_dict(policy or {}, base=settings.default_policy, max_lifetime_cap=settings.max_lifetime_cap)
    capacity.check_memory_for_vm(tpl.memory_mb, settings.memory_reserve_mb)
    if tpl.memory_mb > pol.memory_mb or tpl.vcpus > pol.vcpus or tpl.disk_mb > pol.disk_mb:
        raise InvalidRequest(
            f"template {tpl.name!r} needs {tpl.memory_mb} MiB, {tpl.vcpus} vCPU(s) and a {tpl.disk_mb} MiB disk, "
            f"above the policy's limits policy.memory_mb={pol.memory_mb} / policy.vcpus={pol.vcpus} / "
            f"policy.disk_mb={pol.disk_mb} (a snapshot fixes a VM's size: use a smaller template)"
        )
    now = time.time()
    rec = VmRecord(new_vm_id(), tpl.name, VmState.PENDING, pol, tpl.app_port, now, now, state_changed_at=now)
    rec.h2c_ports = tpl.h2c_ports
    return tpl, rec


def new_vm_id() -> str:
    """12 characters, starting with a letter and without dashes (hostname-safe, unambiguous)."""
    return "v" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(11))


class Transitions:
    """Launch, pause, wake and delete over a Runtime; suspend and restore are its `snapshots`."""

    def __init__(self, settings: VmmSettings, runtime: Runtime, lifecycle: Lifecycle, records: RecordStore) -> None:
        self.settings = settings
        self.runtime = runtime
        self.lifecycle = lifecycle
        self.records = records
        self.snapshots = Snapshots(settings, runtime, lifecycle, records, self.qemu_lost)

    async def launch(self, vm: LiveVm, tpl: Template, payload: bytes) -> None:
        """A pending VM's files, namespace, egress proxy and QEMU, its guest running from the template's
        snapshot; its `run` hook gets `payload`. A failure releases what was acquired and terminates it."""
        vm_id = vm.rec.id
        vm_dir = self.settings.vms_dir / vm_id
        undo = Undo(vm_id)
        try:
            vm_dir.mkdir(parents=True)
            undo.push("remove its files", lambda: _remove_tree(vm_dir))
            from_session = (Path(tpl.path) / AGENT_KEY).exists()  # its guest knows that key: it gets its own
            if from_session:
                copy_key(Path(tpl.path) / AGENT_KEY, vm_dir / AGENT_KEY)
            undo.push("release its uid and cgroup", lambda: self.runtime.release_confinement(vm_id))
            if tpl.base_disk is not None:
                await disks.create_overlay(tpl.base_disk, vm_dir / OVERLAY)
                # The app started while the template booted: its first lines (the newest that fit) belong to
                # every VM's log.
                most = self.settings.app_log_max_bytes
                app_log(self.settings, vm_id).append(AppLog(Path(tpl.path) / APP_LOG, most).tail(most))
            await self.runtime.provision(vm, tpl)  # its cgroup goes with "release its uid and cgroup"
            undo.push("delete the namespace", lambda: self.runtime.delete_network(vm_id))
            await self.runtime.open_egress(vm)
            undo.push("stop the egress proxy", lambda: self.runtime.close_egress(vm_id))
            undo.push("stop QEMU", lambda: self.runtime.stop(vm, f"VM {vm_id} is terminated: its launch failed"))
            ram = await self._launch_ram(vm, tpl, vm_dir)
            await self.snapshots.start_from(vm, tpl, ram, Path(tpl.path) / STATE, ignore_shared=True, purpose="launch")
            if from_session:
                timeout = self.settings.restore_timeout if self.settings.guest_sync else 0.0
                await take_own_key(vm, vm_dir / AGENT_KEY, timeout, f"template {tpl.name!r}")
            await run_hook(vm, tpl, "run", payload)
        except BaseException as exc:
            why = f"its launch failed: {exc}"
            self.lifecycle.record_outcome(vm.rec, VmState.TERMINATING)
            await undo.run()
            self._bury(vm, why)
            if isinstance(exc, Exception):
                raise VmFailed(f"could not launch a VM from template {tpl.name!r}: {exc}") from exc
            raise

    async def _launch_ram(self, vm: LiveVm, tpl: Template, vm_dir: Path) -> RamBacking:
        """The template's RAM file mapped private ("cow": clones share its unchanged pages in memory), or a
        reflinked copy the VM owns and maps shared ("reflink", vmm.reflink): the guest's writes land in it,
        so its disk grows by the pages it changes and every suspend writes device state only."""
        if self.settings.clone_ram != "reflink":
            return RamBacking(Path(tpl.path) / RAM, share=False)
        await asyncio.to_thread(reflink.clone, Path(tpl.path) / RAM, vm_dir / RAM)
        vm.rec.ram_mode = RamMode.OWN_FILE
        return RamBacking(vm_dir / RAM, share=True)

    async def pause(self, vm: LiveVm) -> None:
        """Stop the vCPUs of a running VM; memory stays in the QEMU process."""
        self.lifecycle.refuse_unless(vm.rec, VmState.RUNNING)
        await self.runtime.command(vm, "stop")
        try:
            self.lifecycle.move_if_stored(vm.rec, VmState.PAUSED)
        except VmmError:
            await self.runtime.command(vm, "cont")  # undone: the VM runs on, as the registry says
            raise

    async def wake(self, vm: LiveVm) -> None:
        """Run a paused or suspended VM again (under its lock: vmm.manager.ensure_running)."""
        state = vm.rec.state
        if state is VmState.RUNNING:
            return
        if state is VmState.PAUSED:
            self.lifecycle.move_if_stored(vm.rec, VmState.RUNNING)
            await self.runtime.command(vm, "cont")
            await self.runtime.sync_guest(vm)  # its clock stood still while it was paused
            log.event("vm.resumed", vm=vm.rec.id)
        elif state is VmState.SUSPENDED and vm.moving:
            raise NotRunning(f"VM {vm.rec.id} is moving to another host; try again in a moment")
        elif state is VmState.SUSPENDED:
            await self.snapshots.restore(vm)
        elif state is VmState.FAILED:
            raise VmFailed(f"VM {vm.rec.id} has failed: {vm.rec.reason}")
        else:
            raise Conflict(f"VM {vm.rec.id} is {state.value}")

    async def delete(self, vm: LiveVm, reason: str) -> None:
        """The `terminate` hook of a running VM, then discard."""
        if vm.rec.state is VmState.RUNNING:
            await run_hook(vm, template.load(self.settings, vm.rec.template), "terminate")
        await self.discard(vm, reason)

    async def discard(self, vm: LiveVm, why: str, event: bool = True) -> None:
        """End every process of the VM and remove its namespace and files; keep its record as terminated.

        Each step is tried even if an earlier one failed. `event=False`: it moved away, which the
        host it moved to tells (a `moved` event), so its end here is no `terminated` event.
        """
        vm_id = vm.rec.id
        self.lifecycle.record_outcome(vm.rec, VmState.TERMINATING)
        strays = self.runtime.running_qemus
        steps: tuple[tuple[str, Callable[[], Awaitable[None]]], ...] = (
            ("cut the guest's connections", lambda: self.runtime.cut(vm_id)),
            ("stop QEMU", lambda: self.runtime.stop(vm, f"VM {vm_id} is terminated: {why}")),
            ("end every other QEMU", lambda: self.runtime.kill_strays(vm_id, None, strays().get(f"mvm-{vm_id}", []))),
            ("stop the egress proxy", lambda: self.runtime.close_egress(vm_id)),
            ("delete the namespace", lambda: self.runtime.delete_network(vm_id)),
            ("release its uid and cgroup", lambda: self.runtime.release_confinement(vm_id)),
        )
        for what, step in steps:
            try:
                await step()
            except (VmmError, OSError) as exc:
                log.event("vm.delete_step_failed", level="warning", vm=vm_id, step=what, error=str(exc))
        shutil.rmtree(self.settings.vms_dir / vm_id, ignore_errors=True)
        self._bury(vm, why, event)

    def begin_export(self, vm: LiveVm) -> None:
        """A suspended VM is being copied to another host: no wake until it ends (vm.moving)."""
        self.lifecycle.refuse_unless(vm.rec, VmState.SUSPENDED)
        if vm.moving:
            raise Conflict(f"VM {vm.rec.id} is being moved already")
        vm.moving = True

    async def adopt_moved(self, rec: VmRecord, files: Path, template_created_at: float) -> None:
        """A suspended VM another host exported into `files`, moved into place here and recorded."""
        if rec.id in self.records.live:
            raise Conflict(f"VM {rec.id} exists on this host already")
        tpl = template.load(self.settings, rec.template)
        if abs(tpl.created_at - template_created_at) > 1e-3:
            raise Conflict(
                f"template {rec.template!r} on this host is another snapshot than the VM's (made at "
                f"{tpl.created_at:.0f}, not {template_created_at:.0f}): copy the template's files to move its VMs"
            )
        if rec.state is not VmState.SUSPENDED:
            raise InvalidRequest(f"only a suspended VM can move, VM {rec.id} is {rec.state.value}")
        if tpl.base_disk is not None:
            # its overlay and its checkpoints' layers read through this host's base; a layer over another
            # layer of the VM (a rewind's) names it relatively and moved with it
            for image in (files / OVERLAY, *sorted(files.glob(f"{CHECKPOINTS}/*/{OVERLAY}"))):
                backing = disks.backing_file(image) if image.exists() else None
                if backing is not None and backing.suffix != ".qcow2":
                    await disks.rebase_overlay(image, tpl.base_disk)
        files.rename(self.settings.vms_dir / rec.id)
        rec.pid, rec.reason = None, None
        rec.h2c_ports = tpl.h2c_ports
        self.records.write(rec)
        self.records.add(LiveVm(rec))
        self.records.emit("moved", rec)
        self.records.notify(rec)

    def _bury(self, vm: LiveVm, why: str, event: bool = True) -> None:
        """The VM is gone from this manager; its record stays, terminated, with `why`."""
        self.records.forget(vm.rec.id)
        self.lifecycle.record_outcome(vm.rec, VmState.TERMINATED, reason=why, event=event)
        self.records.bury(vm.rec)

    async def qemu_lost(self, vm: LiveVm, reason: str) -> None:
        """The VM's QEMU ended without being asked to: it is failed and says why (lock held)."""
        await self.runtime.stop(vm)
        await self.runtime.close_egress(vm.rec.id)
        with contextlib.suppress(VmmError):  # the guest is gone; a namespace that cannot be cut holds nothing of it
            await self.runtime.cut(vm.rec.id)
        self.lifecycle.record_outcome(vm.rec, VmState.FAILED, reason=reason)
        log.event("vm.failed", level="error", vm=vm.rec.id, reason=reason)
        await self.runtime.sweep_groups({vm.rec.id})  # its reason is read: the group goes (its files stay)


async def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
