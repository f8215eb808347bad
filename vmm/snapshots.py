"""Snapshots of a VM: starting a guest from one (launch and restore), suspend, and the RAM move.

Every method is called with the VM's lock held. State changes are written to the registry
before the step that makes them true is visible to the guest (RUNNING before `cont`), so a
crash of the manager never leaves a snapshot that looks restorable while its RAM has moved on.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import NoReturn

from qemu.qmp.error import QMPError

from . import disks, faults, reflink, snapshot_check, template
from . import qmp as qmp_ops
from .errors import OverCapacity, RestoreFailed, VmFailed, VmmError
from .hook_runner import run_hook
from .jsonlog import log
from .lifecycle import Lifecycle
from .live import LiveVm
from .model import RamMode, Template, VmState
from .phases import Phases
from .qemu import RamBacking
from .records import RecordStore
from .runtime import OnLost, Runtime
from .settings import VmmSettings
from .undo import Undo
from .vm_files import RAM, STATE, STATE_DEV, app_log, finish_ram_move, remove_snapshot

SUSPEND_ROOM = 16 << 20  # free bytes a suspend needs beyond what it writes (device state, registry, logs)


class Snapshots:
    """Suspend and restore of one VM at a time, over a Runtime."""

    def __init__(
        self, settings: VmmSettings, runtime: Runtime, lifecycle: Lifecycle, records: RecordStore, on_lost: OnLost
    ) -> None:
        self.settings = settings
        self.records = records
        self.runtime = runtime
        self.lifecycle = lifecycle
        self.on_lost = on_lost  # what becomes of a VM whose QEMU ends unasked

    def _vm_dir(self, vm: LiveVm) -> Path:
        return self.settings.vms_dir / vm.rec.id

    async def start_from(
        self, vm: LiveVm, tpl: Template, ram: RamBacking, snapshot: Path, ignore_shared: bool, purpose: str,
        phases: Phases | None = None,
    ) -> None:  # fmt: skip
        """Spawn QEMU, load `snapshot`, mark RUNNING, `cont`, then make the guest safe to use."""
        steps = phases or Phases()
        await self.runtime.load(vm, tpl, ram, snapshot, ignore_shared, purpose, self.on_lost, steps)
        if tpl.base_disk is not None:
            # before `cont`: nothing the app prints is missed
            await self.runtime.open_console(vm, app_log(self.settings, vm.rec.id))
        self.lifecycle.move_if_stored(vm.rec, VmState.RUNNING, reason=None)
        faults.point(f"{purpose}.recorded")
        vm.guest_ran = True  # from here its snapshot may no longer match: the guest writes as soon as it runs
        await self.runtime.command(vm, "cont")
        steps.mark("cont")
        if tpl.base_disk is not None:
            await self.runtime.connect_agent(vm)
            await self.runtime.sync_guest(vm)
            steps.mark("agent_sync")
        faults.point(f"{purpose}.synced")

    # ---- suspend ---------------------------------------------------------------------------

    async def suspend(self, vm: LiveVm, reason: str | None = None) -> None:
        """Snapshot a running or paused VM to disk and end its QEMU (its memory is freed); `reason`
        stays on the record and its event (the reaper's "idle for 300 s")."""
        started = time.monotonic()
        was = vm.rec.state
        path = self._vm_dir(vm) / STATE
        # Own-file RAM is already on disk; copy-on-write RAM must go into the stream.
        ignore_shared = vm.rec.ram_mode is RamMode.OWN_FILE
        tpl = template.load(self.settings, vm.rec.template)  # once for the whole transition
        self._check_room(vm, tpl)
        if was is VmState.RUNNING:
            await run_hook(vm, tpl, "suspend")
        if vm.qmp is not None:  # a flatten under way (vmm.checkpoints) ends first: QEMU cannot save beside it
            await qmp_ops.end_block_jobs(vm.qmp, self.settings.restore_timeout)
        self.lifecycle.move_if_stored(vm.rec, VmState.SUSPENDING)
        try:
            # The guest's connections are cut while its state is saved; both end before anything else.
            _, saved = await asyncio.gather(
                self._cut_connections(vm), self._stop_and_save(vm, was, path, ignore_shared), return_exceptions=True
            )
            if isinstance(saved, BaseException):
                raise saved
            size = saved
            faults.point("suspend.saved")
        except BaseException as exc:
            await self._undo_suspend(vm, was)
            if isinstance(exc, Exception):
                raise VmmError(f"suspend of VM {vm.rec.id} failed, it stays {vm.rec.state.value}: {exc}") from exc
            raise
        # The snapshot is complete: from here the VM is suspended, whatever happens next.
        try:
            await self.runtime.stop(vm, f"VM {vm.rec.id} was suspended")
            await self.runtime.close_egress(vm.rec.id)
            if not ignore_shared:
                size = await self._move_ram_to_own_file(vm, tpl, size)
            await self._compact_ram(vm, tpl)
            await self.release_network(vm.rec.id)
        finally:
            vm.rec.generation += 1
            self.lifecycle.record_outcome(vm.rec, VmState.SUSPENDED, reason=reason)
        log.event("vm.suspended", vm=vm.rec.id, ms=round((time.monotonic() - started) * 1000, 1), bytes=size)

    async def _compact_ram(self, vm: LiveVm, tpl: Template) -> None:
        """vmm.clone_ram = "reflink": the blocks the guest wrote without changing share the template's again,
        so the suspended VM's disk is the pages it changed (vmm.reflink.compact). A failure costs disk only."""
        if self.settings.clone_ram != "reflink" or vm.rec.ram_mode is not RamMode.OWN_FILE:
            return
        started = time.monotonic()
        try:
            given = await asyncio.to_thread(reflink.compact, self._vm_dir(vm) / RAM, Path(tpl.path) / RAM)
        except OSError as exc:
            log.event("vm.ram_compact_failed", level="warning", vm=vm.rec.id, error=str(exc))
            return
        log.event("vm.ram_compacted", vm=vm.rec.id, bytes=given, ms=round((time.monotonic() - started) * 1000, 1))

    async def release_network(self, vm_id: str) -> None:
        """A suspended VM holds no namespace, tap or cgroup (only its files): they are made again at restore.

        Its connections were cut before (the unreachable route stays in a namespace a socket still
        holds), so nothing reaches the gone guest. A failure is logged; the restore replaces what is left.
        """
        try:
            await self.runtime.delete_network(vm_id)
            self.runtime.release_group(vm_id)
        except (VmmError, OSError) as exc:
            log.event("vm.network_release_failed", level="warning", vm=vm_id, error=str(exc))

    async def _cut_connections(self, vm: LiveVm) -> None:
        """Runtime.cut; if it fails the suspend goes on (a pooled connection to the gone guest then
        fails a request with 502 instead of being refused before use), and says so."""
        try:
            await self.runtime.cut(vm.rec.id)
        except VmmError as exc:
            log.event("vm.cut_failed", level="error", vm=vm.rec.id, error=str(exc))

    async def _stop_and_save(self, vm: LiveVm, was: VmState, path: Path, ignore_shared: bool) -> int:
        """The vCPUs stopped (if they ran), the device state (and RAM, unless shared) saved to `path`."""
        if was is VmState.RUNNING:
            await self.runtime.command(vm, "stop")
        return await self.runtime.save(vm, path, ignore_shared)

    async def _undo_suspend(self, vm: LiveVm, was: VmState) -> None:
        """A suspend that did not complete: back to what the VM was, or failed if that is impossible."""
        if not self.runtime.alive(vm):
            if vm.rec.state is VmState.SUSPENDING:
                reason = self.runtime.exit_reason(vm, during=" during a suspend")
                await self.runtime.stop(vm)
                self.lifecycle.record_outcome(vm.rec, VmState.FAILED, reason=reason)
            return
        self.lifecycle.record_outcome(vm.rec, was)
        try:
            await self.runtime.uncut(vm.rec.id)
        except VmmError as exc:
            log.event("vm.uncut_failed", level="error", vm=vm.rec.id, error=str(exc))
        if was is VmState.RUNNING:
            try:
                await self.runtime.command(vm, "cont")
            except VmFailed as exc:
                await self.runtime.stop(vm)
                reason = f"could not resume after a failed suspend: {exc}"
                self.lifecycle.record_outcome(vm.rec, VmState.FAILED, reason=reason)

    def room_needed(self, vm: LiveVm, tpl: Template) -> int:
        """Free bytes a suspend of the running VM needs now (the free-space check's estimate).

        A first suspend writes every page the guest uses twice (the stream, then the VM's own
        RAM file); later ones write device state only.
        """
        needs = SUSPEND_ROOM
        if vm.rec.ram_mode is RamMode.TEMPLATE_COW:
            ram = Path(tpl.path) / RAM
            used = disks.allocated_bytes(ram) + self.runtime.private_dirty(vm, ram)
            needs += 2 * min(used, tpl.memory_mb << 20)
        return needs

    def _check_room(self, vm: LiveVm, tpl: Template) -> None:
        """Refuse a suspend the disk cannot hold, while the VM still runs: running out of space
        half-way would kill the QEMU writing RAM (SIGBUS) or fail the registry write."""
        vm_dir = self._vm_dir(vm)
        needs = self.room_needed(vm, tpl)
        free = shutil.disk_usage(vm_dir).free
        if free < needs:
            raise OverCapacity(
                f"not enough disk space to suspend VM {vm.rec.id}: it needs about {needs >> 20} MiB free in "
                f"{vm_dir} and {free >> 20} MiB are; the VM keeps running (free space, then suspend again)"
            )

    async def _move_ram_to_own_file(self, vm: LiveVm, tpl: Template, stream_size: int) -> int:
        """Turn a clone's full-RAM stream into the VM's own RAM file plus device state.

        Done once, at the first suspend, so that no wake ever pays for loading RAM: the stream
        is loaded into a new shared file and the device state saved again without RAM. On
        failure the full stream stays and the VM still restores from it (more slowly). The
        registry learns the new RAM mode before the device-state file replaces the stream, so
        a crash in between never pairs a RAM-less snapshot with "RAM is in the stream"
        (recovery finishes the rename).
        """
        vm_dir = self._vm_dir(vm)
        ram = RamBacking(vm_dir / RAM, share=True)
        ram.path.unlink(missing_ok=True)
        free = shutil.disk_usage(vm_dir).free
        if free < stream_size + SUSPEND_ROOM:
            log.event("vm.ram_move_skipped", level="warning", vm=vm.rec.id, free=free, needs=stream_size + SUSPEND_ROOM,
                      why="not enough free disk space; the VM restores from its full stream")  # fmt: skip
            return stream_size
        try:
            await self.runtime.load(vm, tpl, ram, vm_dir / STATE, False, "ram-move", self.on_lost)
            size = await self.runtime.save(vm, vm_dir / STATE_DEV, True)
            if self.settings.verify_ram:
                snapshot_check.write(ram.path, await asyncio.to_thread(snapshot_check.sparse_digest, ram.path))
            faults.point("suspend.ram_moved")
        except (VmmError, QMPError, OSError, TimeoutError) as exc:
            ram.path.unlink(missing_ok=True)
            log.event("vm.ram_move_failed", level="warning", vm=vm.rec.id, error=str(exc))
            return stream_size
        finally:
            await self.runtime.stop(vm)
        vm.rec.ram_mode = RamMode.OWN_FILE
        self.records.write(vm.rec)  # before the rename (see above); a failure leaves the full stream in place
        finish_ram_move(vm_dir)
        return size

    # ---- restore ---------------------------------------------------------------------------

    async def restore(self, vm: LiveVm) -> None:
        """Run a suspended VM again from its snapshot; on failure it stays suspended (or is failed)."""
        started = time.monotonic()
        vm_id, vm_dir = vm.rec.id, self._vm_dir(vm)
        own_file = vm.rec.ram_mode is RamMode.OWN_FILE
        ram = RamBacking(vm_dir / RAM, share=True)
        vm.rec.generation += 1
        self.lifecycle.move_if_stored(vm.rec, VmState.RESTORING)
        vm.guest_ran = False  # of an earlier QEMU: nothing has run on this snapshot yet
        undo = Undo(vm_id)
        interrupted: BaseException | None = None
        try:
            snapshot_check.verify(vm_dir / STATE)
            if own_file and self.settings.verify_ram:
                await asyncio.to_thread(snapshot_check.verify, ram.path, True)
            if not own_file:
                # The stream carries all RAM; it is loaded into a fresh file the VM owns from now on.
                ram.path.unlink(missing_ok=True)
            tpl = template.load(self.settings, vm.rec.template)
            # A fresh namespace (one left by a crash is replaced) and cgroup: a failed restore leaves neither.
            await self.runtime.provision(vm, tpl)
            undo.push("delete the namespace and cgroup", lambda: self.release_network(vm_id))
            await self.runtime.open_egress(vm)
            undo.push("stop the egress proxy", lambda: self.runtime.close_egress(vm_id))
            undo.push("stop QEMU", lambda: self.runtime.stop(vm))
            await self.start_from(vm, tpl, ram, vm_dir / STATE, ignore_shared=own_file, purpose="restore")
        except BaseException as exc:
            if not vm.guest_ran or not await self.runtime.guest_runs(vm):
                await self._restore_failed(vm, own_file, exc, undo)
            # The guest runs on RAM it has written to: the VM stays running, nothing of it is lost.
            log.event("vm.restore_step_failed", level="warning", vm=vm_id, error=str(exc) or repr(exc),
                      kept="running")  # fmt: skip
            interrupted = None if isinstance(exc, Exception) else exc
        undo.keep()
        # The snapshot no longer matches the RAM file the guest now writes to.
        remove_snapshot(vm_dir)
        vm.rec.ram_mode = RamMode.OWN_FILE
        self.lifecycle.record_outcome(vm.rec, VmState.RUNNING)
        if interrupted is not None:
            raise interrupted
        await run_hook(vm, tpl, "resume")
        log.event("vm.restored", vm=vm_id, ms=round((time.monotonic() - started) * 1000, 1))

    async def _restore_failed(self, vm: LiveVm, own_file: bool, exc: BaseException, undo: Undo) -> NoReturn:
        """Release what the restore acquired. The VM stays suspended if its snapshot still holds: the
        guest never ran, or ran on a fresh copy of the RAM in a full stream. A guest that ran on the
        VM's own RAM file has moved past the device state saved with it: the VM is failed, never left
        suspended over a snapshot that cannot load again."""
        vm_dir = self._vm_dir(vm)
        spent = vm.guest_ran and own_file
        await undo.run()
        if spent:
            remove_snapshot(vm_dir)
            reason = f"restore failed after its guest ran, so its snapshot no longer matches its RAM: {exc}"
            self.lifecycle.record_outcome(vm.rec, VmState.FAILED, reason=reason)
            log.event("vm.failed", level="error", vm=vm.rec.id, reason=reason)
            if isinstance(exc, Exception):
                raise VmFailed(f"restore of VM {vm.rec.id} failed after its guest ran; it is failed: {exc}") from exc
            raise exc
        if not own_file:
            (vm_dir / RAM).unlink(missing_ok=True)
        self.lifecycle.record_outcome(vm.rec, VmState.SUSPENDED, reason=f"restore failed: {exc}")
        log.event("vm.restore_failed", level="error", vm=vm.rec.id, error=str(exc))
        if isinstance(exc, Exception):
            raise RestoreFailed(f"restore of VM {vm.rec.id} failed; it stays suspended: {exc}") from exc
        raise exc
