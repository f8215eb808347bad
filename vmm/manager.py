"""The VM manager: lifecycle of every VM, one transition at a time per VM.

Each VM has a lock that serialises its transitions and at most one wake task that all
concurrent callers share, so twenty requests to a suspended VM cause one restore. State
changes are written to the registry before the step that makes them true is visible to
the guest (RUNNING before `cont`), so a crash of the manager never leaves a snapshot
that looks restorable while its RAM has moved on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from qemu.qmp.error import QMPError

from . import accel as accel_mod
from . import capacity, disks, faults, lifecycle, netns, snapshot_check, statelock, template
from . import qmp as qmp_ops
from .agent import Agent, AgentError, Exec, load_key
from .applog import AppLog
from .console import ConsoleReader
from .egress import EgressServer
from .errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    NotRunning,
    OverCapacity,
    RegistryError,
    RestoreFailed,
    VmFailed,
    VmmError,
)
from .hooks import HookOutcome, Hooks, call_http, check_payload
from .image import Image, list_images, remove_image
from .jail import Jailer
from .jsonlog import log
from .model import RamMode, Template, VmRecord, VmState
from .open_work import OpenWork
from .policy import Policy
from .qemu import (
    AGENT_SOCKET,
    APP_CONSOLE,
    APP_LOG,
    QMP_SOCKET,
    SERIAL_LOG,
    DiskBacking,
    QemuProcess,
    RamBacking,
    describe_exit,
    kill_pid,
    qemus_by_name,
    start_ticks,
)
from .registry import ProcessIntent, Registry
from .settings import VmmSettings
from .template import guest_log_tail

_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
QMP_CONNECT_TIMEOUT = 10.0
ACTIVITY_FLUSH_SECONDS = 2.0
APP_LOG_CHECK_SECONDS = 0.1  # how often each live VM's app log is checked against its bound (a stat each)
SYNC_SKEW_MS = 5.0  # a guest clock further off than this after a sync is synced once more
GUEST_TOOL = "/mvm/init"  # also the guest's file and hook tool (guest/init)
OVERLAY = "disk.qcow2"  # the VM's own writes, over its template's read-only base disk
AGENT_KEY = "agent.key"  # the VM's key for its guest agent (0600)
STATE = "state"  # the VM's snapshot: device state (and all RAM, until its first suspend's RAM move ends)
STATE_DEV = "state.dev"  # device state saved by the RAM move, renamed over STATE once the registry knows
RAM = "ram"  # the VM's own RAM file, shared with its QEMU
SUSPEND_ROOM = 16 << 20  # free bytes a suspend needs beyond what it writes (device state, registry, logs)
_LIVE = (VmState.RUNNING, VmState.PAUSED)


def new_vm_id() -> str:
    """12 characters, starting with a letter and without dashes (hostname-safe, unambiguous)."""
    return "v" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(11))


class _Vm:
    """Runtime companions of one VM record: its QEMU, QMP connection, lock and wake task."""

    def __init__(self, rec: VmRecord) -> None:
        self.rec = rec
        self.proc: QemuProcess | None = None
        self.qmp: qmp_ops.Qmp | None = None
        self.lock = asyncio.Lock()
        self.wake: asyncio.Task[None] | None = None
        self.expect_exit = False
        self.guest_ran = False  # its QEMU was sent `cont`: the guest writes to the RAM its snapshot was loaded over
        self.agent: Agent | None = None  # disk images only
        self.console: ConsoleReader | None = None  # disk images only: the app's stdout and stderr
        self.moving = False  # its files are being copied to another host: no wake until that ends


class VmManager:
    """Creates, pauses, suspends, restores and deletes VMs; the edge's VmBackend."""

    def __init__(self, settings: VmmSettings, egress: EgressServer | None = None, lock_fd: int | None = None) -> None:
        self.settings = settings
        self._given_lock = lock_fd  # the state directory's lock, taken by `mvm serve` before it started us
        self.egress = egress  # serves each running VM's egress proxy (the edge's); None: guests have none
        self.accel = accel_mod.choose(settings.accelerator)
        self.jail = Jailer(settings)  # every QEMU confined and limited (vmm/jail.py, vmm/cgroups.py)
        self.listeners: list[Callable[[VmRecord], None]] = []
        self.open_work = OpenWork()  # what keeps each VM awake: counted here, or reported by edge workers
        self._vms: dict[str, _Vm] = {}
        self._terminated: dict[str, VmRecord] = {}  # kept for `mvm vm get` until vmm.terminated_ttl
        self._dirty: set[str] = set()
        self._unsaved: set[str] = set()  # records whose last registry write failed; the flusher retries
        self._registry: Registry | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._log_rotator: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None
        self._building: set[str] = set()
        self._wakes_refused = False  # the process is stopping: nothing is resumed or restored any more

    # ---- start and stop -------------------------------------------------------------

    async def start(self) -> None:
        """Open the registry and take back every VM an earlier manager left behind."""
        self.settings.vms_dir.mkdir(parents=True, exist_ok=True)
        self._lock_state_dir()
        self.jail.start()
        self._registry = Registry(self.settings.registry_path)
        running = qemus_by_name()
        for rec in self._registry.load_all():
            if rec.state is VmState.TERMINATED:
                self._terminated[rec.id] = rec
                continue
            vm = _Vm(rec)
            self._vms[rec.id] = vm
            await self._recover(vm, running.get(f"mvm-{rec.id}", []))
        self._flusher = asyncio.create_task(self._flush_activity_forever())
        self._log_rotator = asyncio.create_task(self._rotate_app_logs_forever())
        log.event("vmm.started", accelerator=self.accel.name, vms=len(self._vms))

    def refuse_wakes(self) -> None:
        """From now on no VM is resumed or restored, whoever asks (proxy, control API, exec):
        a stopping process must not wake a VM that its on_shutdown step is about to suspend."""
        self._wakes_refused = True

    async def close(self) -> None:
        """Stop managing: running VMs keep running (re-adopted later) or are suspended."""
        for task in (self._flusher, self._log_rotator):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for vm in list(self._vms.values()):
            if self.settings.on_shutdown == "suspend" and vm.rec.state in _LIVE:
                with contextlib.suppress(VmmError):
                    await self.suspend(vm.rec.id)
            if vm.qmp is not None:
                await vm.qmp.disconnect_quietly()
            if vm.agent is not None:
                await vm.agent.close("the manager stopped")
            if vm.console is not None:
                await vm.console.close(drain=False)
            if vm.proc is not None:
                vm.proc.close()
        self._flush_activity()
        if self._registry is not None:
            self._registry.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock_state_dir(self) -> None:
        """One manager per state directory: a second one would take the first one's VMs for dead."""
        state_dir, given = self.settings.state_dir, self._given_lock
        self._lock_fd = statelock.take(state_dir) if given is None else statelock.adopt(state_dir, given)

    # ---- queries (the edge's hot path: in memory only) ------------------------------

    def lookup(self, vm_id: str) -> VmRecord | None:
        vm = self._vms.get(vm_id)
        return vm.rec if vm is not None else None

    def get(self, vm_id: str) -> VmRecord:
        """A VM, or what is left of a terminated one (for vmm.terminated_ttl)."""
        vm = self._vms.get(vm_id)
        if vm is not None:
            return vm.rec
        tombstone = self._terminated.get(vm_id)
        if tombstone is None:
            raise NotFound(f"VM {vm_id!r} does not exist")
        return tombstone

    def list_vms(self) -> list[VmRecord]:
        return [vm.rec for vm in self._vms.values()]

    def counts_by_state(self) -> dict[str, int]:
        counts = Counter(vm.rec.state.value for vm in self._vms.values())
        return {state.value: counts.get(state.value, 0) for state in VmState if state != VmState.TERMINATED}

    def touch(self, vm_id: str, at: float | None = None) -> None:
        """Activity now, or at `at` (an edge's batch); never moves the time backwards."""
        vm = self._vms.get(vm_id)
        if vm is not None:
            vm.rec.last_activity = max(vm.rec.last_activity, time.time() if at is None else at)
            self._dirty.add(vm_id)

    def vm_dir(self, vm_id: str) -> Path:
        return self.settings.vms_dir / vm_id

    def templates(self) -> list[Template]:
        return template.list_all(self.settings)

    def remove_template(self, name: str) -> None:
        users = [vm.rec.id for vm in self._vms.values() if vm.rec.template == name]
        if name in self._building:
            raise Conflict(f"template {name!r} is being created")
        template.remove(self.settings, name, users)
        log.event("template.removed", template=name)

    def images(self) -> list[Image]:
        return list_images(self.settings.images_dir)

    def remove_image(self, name: str) -> None:
        users = [t.name for t in self.templates() if t.image == name]
        remove_image(self.settings.images_dir, name, users)
        log.event("image.removed", image=name)

    def app_log(self, vm_id: str) -> AppLog:
        """The VM's app output: app.log for disk images, the console for the initramfs demo."""
        vm_dir = self.vm_dir(self._vm(vm_id).rec.id)
        name = APP_LOG if (vm_dir / OVERLAY).exists() else SERIAL_LOG
        return AppLog(vm_dir / name, self.settings.app_log_max_bytes)

    async def create_template(self, name: str, image: str, progress: Callable[[str], None]) -> Template:
        if name in self._building:
            raise Conflict(f"template {name!r} is being created already")
        self._building.add(name)
        try:
            return await template.create(self.settings, name, image, self.accel, progress)
        finally:
            self._building.discard(name)

    async def exec(
        self, vm_id: str, argv: list[str], env: list[str], cwd: str, uid: int, gid: int,
        pty: tuple[int, int] | None = None,
    ) -> Exec:  # fmt: skip
        """Start a command in the guest (waking the VM like a request does); iterate the Exec for output."""
        vm = self._vm(vm_id)
        await self.ensure_running(vm_id)
        if vm.agent is None:
            has_disk = (self.vm_dir(vm_id) / OVERLAY).exists()
            why = "its guest agent is not connected" if has_disk else "its image has no guest agent (the demo)"
            raise AgentError(f"cannot exec in VM {vm_id}: {why}")
        self.touch(vm_id)
        return await vm.agent.exec(argv, env, cwd, uid, gid, pty)

    @contextlib.contextmanager
    def busy(self, vm_id: str) -> Iterator[None]:
        """Work on the VM (an exec, a shell, a file transfer) is under way: it counts as activity throughout."""
        self._vm(vm_id)
        try:
            with self.open_work.hold(vm_id):
                yield
        finally:
            self.touch(vm_id)

    def busy_count(self, vm_id: str) -> int:
        """Open work on the VM: held in this process, or reported by the edges (the idle reaper's figure)."""
        return self.open_work.get(vm_id, 0)

    async def open_upstream(self, vm_id: str, port: int, timeout: float) -> socket.socket:
        return await netns.connect_guest(vm_id, port, timeout)

    # ---- lifecycle --------------------------------------------------------------------

    async def create_vm(
        self, template_name: str | None = None, policy: dict[str, Any] | None = None, run_payload: Any = None
    ) -> VmRecord:
        """Launch a VM from a template: copy-on-write RAM, no boot, no memory copy.

        The image's `run` hook, if it has one, gets `run_payload` (JSON, at most 16 KiB) once.
        """
        payload = check_payload(run_payload) if run_payload is not None else b"{}"
        tpl = template.load(self.settings, template_name or self.settings.default_template)
        cap = self.settings.max_lifetime_cap
        pol = Policy.from_dict(policy or {}, base=self.settings.default_policy, max_lifetime_cap=cap)
        capacity.check_memory_for_vm(tpl.memory_mb, self.settings.memory_reserve_mb)
        if tpl.memory_mb > pol.memory_mb or tpl.vcpus > pol.vcpus or tpl.disk_mb > pol.disk_mb:
            raise InvalidRequest(
                f"template {tpl.name!r} needs {tpl.memory_mb} MiB, {tpl.vcpus} vCPU(s) and a {tpl.disk_mb} MiB disk, "
                f"above the policy's limits policy.memory_mb={pol.memory_mb} / policy.vcpus={pol.vcpus} / "
                f"policy.disk_mb={pol.disk_mb} (a snapshot fixes a VM's size: use a smaller template)"
            )
        now = time.time()
        vm_id = new_vm_id()
        rec = VmRecord(vm_id, tpl.name, VmState.PENDING, pol, tpl.app_port, now, now, state_changed_at=now)
        vm = _Vm(rec)
        try:
            self._store(vm)
        except (sqlite3.Error, OSError) as exc:
            raise RegistryError(f"could not record a new VM: {exc}") from exc
        self._vms[vm_id] = vm
        async with vm.lock:
            try:
                self.vm_dir(vm_id).mkdir(parents=True)
                if tpl.base_disk is not None:
                    await disks.create_overlay(tpl.base_disk, self.vm_dir(vm_id) / OVERLAY)
                    # The app started while the template booted: its first lines (the newest that fit) belong to
                    # every VM's log.
                    most = self.settings.app_log_max_bytes
                    self.app_log(vm_id).append(AppLog(Path(tpl.path) / APP_LOG, most).tail(most))
                await netns.create(vm_id)
                await self._open_egress(vm)
                ram = RamBacking(Path(tpl.path) / RAM, share=False)
                await self._start_qemu(vm, tpl, ram, Path(tpl.path) / STATE, ignore_shared=True, purpose="launch")
                await self._run_hook(vm, tpl, "run", payload)
            except BaseException as exc:
                await self._discard(vm, f"its launch failed: {exc}")
                if isinstance(exc, Exception):
                    raise VmFailed(f"could not launch a VM from template {tpl.name!r}: {exc}") from exc
                raise
        log.event("vm.created", vm=vm_id, template=tpl.name, ms=round((time.time() - now) * 1000, 1))
        return rec

    async def pause(self, vm_id: str) -> VmRecord:
        """Stop the vCPUs; memory stays in the QEMU process."""
        vm = self._vm(vm_id)
        async with vm.lock:
            if vm.rec.state is VmState.PAUSED:
                return vm.rec
            self._require(vm, VmState.RUNNING)
            await self._qmp(vm, "stop")
            try:
                self._set(vm, VmState.PAUSED)
            except RegistryError:
                await self._qmp(vm, "cont")  # undone: the VM runs on, as the registry says
                raise
        log.event("vm.paused", vm=vm_id)
        return vm.rec

    async def resume(self, vm_id: str) -> VmRecord:
        """Run a paused or suspended VM again (shares any wake already under way).

        Counts as activity, so the idle reaper does not put it straight back to sleep.
        """
        await self.ensure_running(vm_id, explicit=True)
        self.touch(vm_id)
        return self._vm(vm_id).rec

    async def ensure_running(self, vm_id: str, explicit: bool = False) -> bool:
        """Single-flight wake: every concurrent caller awaits the same task. True if it had to wake.

        A request wakes a VM only if its policy has auto_resume; `explicit` (a resume call) always does.
        """
        vm = self._vm(vm_id)
        if vm.rec.state is VmState.RUNNING:
            return False
        if self._wakes_refused:
            raise NotRunning(f"VM {vm_id} is {vm.rec.state.value} and is not woken while its host stops; try again")
        if not explicit and not vm.rec.policy.auto_resume and vm.rec.state in (VmState.PAUSED, VmState.SUSPENDED):
            raise NotRunning(
                f"VM {vm_id} is {vm.rec.state.value} and its policy has auto_resume=false: "
                f"resume it explicitly (POST /v1/vms/{vm_id}/resume or `mvm vm resume {vm_id}`)"
            )
        if vm.wake is None or vm.wake.done():
            vm.wake = asyncio.create_task(self._wake(vm))
        await asyncio.shield(vm.wake)
        return True

    async def guest_traffic_age(self, vm_id: str) -> float | None:
        """Seconds since bytes last moved between the guest and whoever reached it (vmm.netns)."""
        return await netns.guest_traffic_age(vm_id)

    async def confirm_running(self, vm_id: str) -> bool:
        """An edge could not reach the guest of a VM it took for running. This manager's view
        is the VM's own (no catalog in between), so this is ensure_running."""
        return await self.ensure_running(vm_id)

    async def suspend(self, vm_id: str) -> VmRecord:
        """Snapshot to disk and end the QEMU process; its memory is freed."""
        vm = self._vm(vm_id)
        async with vm.lock:
            if vm.rec.state is VmState.SUSPENDED:
                return vm.rec
            self._require(vm, *_LIVE)
            await self._suspend_locked(vm)
        return vm.rec

    async def delete(self, vm_id: str, reason: str = "deleted") -> None:
        """Terminate the VM and remove everything it had: every process, namespace and file.

        `reason` stays on its terminated record (e.g. the reaper's "reached its max_lifetime").
        """
        vm = self._vm(vm_id)
        async with vm.lock:
            if vm.rec.state is VmState.RUNNING:
                await self._run_hook(vm, template.load(self.settings, vm.rec.template), "terminate")
            await self._discard(vm, reason)
        log.event("vm.deleted", vm=vm_id, reason=reason)

    # ---- moving between hosts --------------------------------------------------------

    async def begin_export(self, vm_id: str) -> tuple[VmRecord, Template, Path]:
        """A suspended VM's files may now be copied to another host; wakes are refused until end_export."""
        vm = self._vm(vm_id)
        async with vm.lock:
            self._require(vm, VmState.SUSPENDED)
            if vm.moving:
                raise Conflict(f"VM {vm_id} is being moved already")
            vm.moving = True
        return vm.rec, template.load(self.settings, vm.rec.template), self.vm_dir(vm_id)

    async def end_export(self, vm_id: str, moved_to: str | None) -> None:
        """The copy is done: gone from here if it moved (`moved_to`), else it stays and may wake again."""
        vm = self._vm(vm_id)
        async with vm.lock:
            vm.moving = False
            if moved_to is not None:
                await self._discard(vm, f"moved to host {moved_to}")
        log.event("vm.exported", vm=vm_id, moved_to=moved_to)

    async def adopt_moved(self, rec: VmRecord, files: Path, template_created_at: float) -> VmRecord:
        """Take over a suspended VM whose files another host exported into `files` (moved into place here)."""
        if rec.id in self._vms:
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
            await disks.rebase_overlay(files / OVERLAY, tpl.base_disk)
        files.rename(self.vm_dir(rec.id))
        rec.pid, rec.reason = None, None
        vm = _Vm(rec)
        self._store(vm)
        self._terminated.pop(rec.id, None)  # it left this host once and is back: live again
        self._vms[rec.id] = vm
        self._notify(rec)
        log.event("vm.imported", vm=rec.id, template=rec.template)
        return rec

    # ---- transitions (called with vm.lock held) --------------------------------------

    async def _wake(self, vm: _Vm) -> None:
        async with vm.lock:
            state = vm.rec.state
            if state is VmState.RUNNING:
                return
            if state is VmState.PAUSED:
                self._set(vm, VmState.RUNNING)
                await self._qmp(vm, "cont")
                await self._sync_guest(vm)  # its clock stood still while it was paused
                log.event("vm.resumed", vm=vm.rec.id)
            elif state is VmState.SUSPENDED and vm.moving:
                raise NotRunning(f"VM {vm.rec.id} is moving to another host; try again in a moment")
            elif state is VmState.SUSPENDED:
                await self._restore(vm)
            elif state is VmState.FAILED:
                raise VmFailed(f"VM {vm.rec.id} has failed: {vm.rec.reason}")
            else:
                raise Conflict(f"VM {vm.rec.id} is {state.value}")

    async def _suspend_locked(self, vm: _Vm) -> None:
        started = time.monotonic()
        was = vm.rec.state
        path = self.vm_dir(vm.rec.id) / STATE
        # Own-file RAM is already on disk; copy-on-write RAM must go into the stream.
        ignore_shared = vm.rec.ram_mode is RamMode.OWN_FILE
        tpl = template.load(self.settings, vm.rec.template)  # once for the whole transition
        self._check_room_to_suspend(vm, tpl)
        if was is VmState.RUNNING:
            await self._run_hook(vm, tpl, "suspend")
        self._set(vm, VmState.SUSPENDING)
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
            await self._stop_qemu(vm, f"VM {vm.rec.id} was suspended")
            await self._close_egress(vm.rec.id)
            if not ignore_shared:
                size = await self._move_ram_to_own_file(vm, tpl, size)
        finally:
            vm.rec.generation += 1
            self._record(vm, VmState.SUSPENDED)
        log.event("vm.suspended", vm=vm.rec.id, ms=round((time.monotonic() - started) * 1000, 1), bytes=size)

    async def _cut_connections(self, vm: _Vm) -> None:
        """netns.cut_guest; if it fails the suspend goes on (a pooled connection to the gone guest then
        fails a request with 502 instead of being refused before use), and says so."""
        try:
            await netns.cut_guest(vm.rec.id)
        except VmmError as exc:
            log.event("vm.cut_failed", level="error", vm=vm.rec.id, error=str(exc))

    async def _stop_and_save(self, vm: _Vm, was: VmState, path: Path, ignore_shared: bool) -> int:
        """The vCPUs stopped (if they ran), the device state (and RAM, unless shared) saved to `path`."""
        if was is VmState.RUNNING:
            await self._qmp(vm, "stop")
        assert vm.qmp is not None and vm.proc is not None
        return await qmp_ops.save(vm.qmp, path, ignore_shared, self.settings.restore_timeout, vm.proc.exited)

    async def _undo_suspend(self, vm: _Vm, was: VmState) -> None:
        """A suspend that did not complete: back to what the VM was, or failed if that is impossible."""
        if vm.proc is None or not vm.proc.alive:
            if vm.rec.state is VmState.SUSPENDING:
                status = vm.proc.exit_status if vm.proc is not None else None
                await self._stop_qemu(vm)
                reason = f"{describe_exit(status)} during a suspend{self._qemu_log_tail(vm.rec.id)}"
                self._record(vm, VmState.FAILED, reason=reason)
            return
        self._record(vm, was)
        try:
            await netns.uncut_guest(vm.rec.id)
        except VmmError as exc:
            log.event("vm.uncut_failed", level="error", vm=vm.rec.id, error=str(exc))
        if was is VmState.RUNNING:
            try:
                await self._qmp(vm, "cont")
            except VmFailed as exc:
                await self._stop_qemu(vm)
                self._record(vm, VmState.FAILED, reason=f"could not resume after a failed suspend: {exc}")

    async def _move_ram_to_own_file(self, vm: _Vm, tpl: Template, stream_size: int) -> int:
        """Turn a clone's full-RAM stream into the VM's own RAM file plus device state.

        Done once, at the first suspend, so that no wake ever pays for loading RAM: the stream
        is loaded into a new shared file and the device state saved again without RAM. On
        failure the full stream stays and the VM still restores from it (more slowly). The
        registry learns the new RAM mode before the device-state file replaces the stream, so
        a crash in between never pairs a RAM-less snapshot with "RAM is in the stream"
        (recovery finishes the rename).
        """
        vm_dir = self.vm_dir(vm.rec.id)
        ram = RamBacking(vm_dir / RAM, share=True)
        ram.path.unlink(missing_ok=True)
        free = shutil.disk_usage(vm_dir).free
        if free < stream_size + SUSPEND_ROOM:
            log.event("vm.ram_move_skipped", level="warning", vm=vm.rec.id, free=free, needs=stream_size + SUSPEND_ROOM,
                      why="not enough free disk space; the VM restores from its full stream")  # fmt: skip
            return stream_size
        try:
            await self._spawn_and_load(vm, tpl, ram, vm_dir / STATE, ignore_shared=False, purpose="ram-move")
            assert vm.qmp is not None and vm.proc is not None
            size = await qmp_ops.save(vm.qmp, vm_dir / STATE_DEV, True, self.settings.restore_timeout, vm.proc.exited)
            if self.settings.verify_ram:
                snapshot_check.write(ram.path, await asyncio.to_thread(snapshot_check.sparse_digest, ram.path))
            faults.point("suspend.ram_moved")
        except (VmmError, QMPError, OSError, TimeoutError) as exc:
            ram.path.unlink(missing_ok=True)
            log.event("vm.ram_move_failed", level="warning", vm=vm.rec.id, error=str(exc))
            return stream_size
        finally:
            await self._stop_qemu(vm)
        vm.rec.ram_mode = RamMode.OWN_FILE
        self._store(vm)
        _finish_ram_move(vm_dir)
        return size

    async def _restore(self, vm: _Vm) -> None:
        started = time.monotonic()
        vm_dir = self.vm_dir(vm.rec.id)
        own_file = vm.rec.ram_mode is RamMode.OWN_FILE
        ram = RamBacking(vm_dir / RAM, share=True)
        vm.rec.generation += 1
        self._set(vm, VmState.RESTORING)
        interrupted: BaseException | None = None
        try:
            snapshot_check.verify(vm_dir / STATE)
            if own_file and self.settings.verify_ram:
                await asyncio.to_thread(snapshot_check.verify, ram.path, True)
            if not own_file:
                # The stream carries all RAM; it is loaded into a fresh file the VM owns from now on.
                ram.path.unlink(missing_ok=True)
            tpl = template.load(self.settings, vm.rec.template)
            if netns.exists(vm.rec.id):
                await netns.uncut_guest(vm.rec.id)
            else:
                await netns.create(vm.rec.id)
            await self._open_egress(vm)
            await self._start_qemu(vm, tpl, ram, vm_dir / STATE, ignore_shared=own_file, purpose="restore")
        except BaseException as exc:
            if not vm.guest_ran or not await self._guest_runs(vm):
                await self._restore_failed(vm, own_file, exc)
            # The guest runs on RAM it has written to: the VM stays running, nothing of it is lost.
            log.event("vm.restore_step_failed", level="warning", vm=vm.rec.id, error=str(exc) or repr(exc),
                      kept="running")  # fmt: skip
            interrupted = None if isinstance(exc, Exception) else exc
        # The snapshot no longer matches the RAM file the guest now writes to.
        _remove_snapshot(vm_dir)
        vm.rec.ram_mode = RamMode.OWN_FILE
        self._record(vm, VmState.RUNNING)
        if interrupted is not None:
            raise interrupted
        await self._run_hook(vm, tpl, "resume")
        log.event("vm.restored", vm=vm.rec.id, ms=round((time.monotonic() - started) * 1000, 1))

    async def _guest_runs(self, vm: _Vm) -> bool:
        """After a restore step failed past `cont`: does the guest run on in a live QEMU?"""
        if vm.qmp is None or vm.proc is None or not vm.proc.alive:
            return False
        try:
            async with asyncio.timeout(QMP_CONNECT_TIMEOUT):
                return await qmp_ops.status(vm.qmp) == "running"
        except (QMPError, OSError, TimeoutError):
            return False

    async def _restore_failed(self, vm: _Vm, own_file: bool, exc: BaseException) -> NoReturn:
        """End what the restore started. The VM stays suspended if its snapshot still holds: the guest
        never ran, or ran on a fresh copy of the RAM in a full stream. A guest that ran on the VM's own
        RAM file has moved past the device state saved with it: the VM is failed, never left suspended
        over a snapshot that cannot load again."""
        vm_dir = self.vm_dir(vm.rec.id)
        spent = vm.guest_ran and own_file
        await self._stop_qemu(vm)
        await self._close_egress(vm.rec.id)
        with contextlib.suppress(VmmError):
            await netns.cut_guest(vm.rec.id)
        if spent:
            _remove_snapshot(vm_dir)
            reason = f"restore failed after its guest ran, so its snapshot no longer matches its RAM: {exc}"
            self._record(vm, VmState.FAILED, reason=reason)
            log.event("vm.failed", level="error", vm=vm.rec.id, reason=reason)
            if isinstance(exc, Exception):
                raise VmFailed(f"restore of VM {vm.rec.id} failed after its guest ran; it is failed: {exc}") from exc
            raise exc
        if not own_file:
            (vm_dir / RAM).unlink(missing_ok=True)
        self._record(vm, VmState.SUSPENDED, reason=f"restore failed: {exc}")
        log.event("vm.restore_failed", level="error", vm=vm.rec.id, error=str(exc))
        if isinstance(exc, Exception):
            raise RestoreFailed(f"restore of VM {vm.rec.id} failed; it stays suspended: {exc}") from exc
        raise exc

    async def _start_qemu(
        self, vm: _Vm, tpl: Template, ram: RamBacking, snapshot: Path, ignore_shared: bool, purpose: str
    ) -> None:
        """Spawn QEMU, load `snapshot`, mark RUNNING, `cont`, then make the guest safe to use."""
        await self._spawn_and_load(vm, tpl, ram, snapshot, ignore_shared, purpose)
        if tpl.base_disk is not None:
            await self._open_console(vm)  # before `cont`: nothing the app prints is missed
        self._set(vm, VmState.RUNNING, reason=None)
        faults.point(f"{purpose}.recorded")
        vm.guest_ran = True  # from here its snapshot may no longer match: the guest writes as soon as it runs
        await self._qmp(vm, "cont")
        if tpl.base_disk is not None:
            await self._connect_agent(vm)
            await self._sync_guest(vm)
        faults.point(f"{purpose}.synced")

    async def _open_console(self, vm: _Vm) -> None:
        vm.console = await ConsoleReader.open(vm.rec.id, self.vm_dir(vm.rec.id) / APP_CONSOLE, self.app_log(vm.rec.id))

    async def _connect_agent(self, vm: _Vm) -> None:
        try:
            vm_dir = self.vm_dir(vm.rec.id)
            vm.agent = await Agent.connect(vm_dir / AGENT_SOCKET, load_key(vm_dir / AGENT_KEY))
        except (AgentError, OSError) as exc:  # the guest runs on without it: exec says so
            log.event("vm.agent_unavailable", level="warning", vm=vm.rec.id, error=str(exc))

    async def _sync_guest(self, vm: _Vm) -> None:
        """Before any held request is released: the host's wall clock, fresh entropy, the VM id as hostname.

        Every clone of a snapshot wakes with the snapshot's clock and RNG state. A guest whose
        agent does not answer keeps working: the step is logged and skipped, never waited on.
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

    async def _run_hook(self, vm: _Vm, tpl: Template, event: str, payload: bytes = b"{}") -> None:
        """The image's hook for `event`, if it has one. Failures and timeouts are logged, never raised."""
        try:
            hooks = tpl.hooks
            if hooks is None or not hooks.has(event):
                return
            started = time.monotonic()
            outcomes = []
            if event in hooks.http:
                outcomes.append(await call_http(vm.rec.id, hooks, event, payload))
            if event in hooks.exec:
                outcomes.append(await self._exec_hook(vm, hooks, event))
        except Exception as exc:
            log.event("vm.hook", level="warning", vm=vm.rec.id, hook=event, ok=False, error=repr(exc))
            return
        ok = all(o.ok for o in outcomes)
        ms = round((time.monotonic() - started) * 1000, 1)
        output = " | ".join(o.detail for o in outcomes)
        log.event("vm.hook", level="info" if ok else "warning", vm=vm.rec.id, hook=event, ok=ok, ms=ms, output=output)

    async def _exec_hook(self, vm: _Vm, hooks: Hooks, event: str) -> HookOutcome:
        """/etc/mvm/hooks/<event>.d through the agent, killed at the hook's timeout."""
        if vm.agent is None:
            return HookOutcome(False, "no guest agent to run /etc/mvm/hooks")
        output, code, ex = bytearray(), None, None
        try:
            async with asyncio.timeout(hooks.timeout(event)):  # the start too: a guest may stop reading its port
                ex = await vm.agent.exec([GUEST_TOOL, "hooks", event], [], "/", 0, 0)
                async for item in ex:
                    if item.kind == "exit":
                        code = item.code
                    elif item.kind == "error":
                        return HookOutcome(False, item.data.decode(errors="replace"))
                    elif len(output) < 4096:
                        output += item.data
        except TimeoutError:
            text = output.decode(errors="replace").strip()
            return HookOutcome(False, f"/etc/mvm/hooks/{event}.d ran past {hooks.timeout(event):g} s: {text}")
        finally:
            if ex is not None and not ex.finished:
                await ex.abandon()
        text = output.decode(errors="replace").strip()
        return HookOutcome(code == 0, f"/etc/mvm/hooks/{event}.d exited {code}: {text}")

    async def _spawn_and_load(
        self, vm: _Vm, tpl: Template, ram: RamBacking, snapshot: Path, ignore_shared: bool, purpose: str
    ) -> None:
        """Spawn QEMU waiting for a migration and load `snapshot`; the guest stays stopped.

        The process is in the registry before anything depends on it, so a manager that dies
        from here on leaves nothing a restart cannot find.
        """
        vm_id = vm.rec.id
        vm_dir = self.vm_dir(vm_id)
        if purpose == "launch":
            snapshot_check.verify(snapshot)
        spec = template.machine_spec(tpl, f"mvm-{vm_id}", self.accel)
        sock = vm_dir / QMP_SOCKET
        sock.unlink(missing_ok=True)
        disk = DiskBacking(vm_dir / OVERLAY, "qcow2") if spec.has_disk else None
        vm.expect_exit = vm.guest_ran = False
        proc = await self.jail.spawn_vm(vm.rec, tpl, spec, ram, disk, vm_dir, lambda p, st: self._on_exit(vm, p, st))
        vm.proc = proc
        try:
            if self._registry is not None:
                self._registry.add_process(ProcessIntent(proc.pid, vm_id, proc.start_ticks, purpose), time.time())
            if purpose != "ram-move":
                vm.rec.pid = proc.pid  # the process that runs the guest, adopted after a restart
                self._store(vm)
        except (sqlite3.Error, OSError) as exc:
            await self._stop_qemu(vm)
            raise RegistryError(f"could not record VM {vm_id}'s QEMU in the registry: {exc}") from exc
        faults.point(f"{purpose}.spawned")
        try:
            vm.qmp = await qmp_ops.connect(sock, spec.name, QMP_CONNECT_TIMEOUT, lambda: proc.alive)
            await qmp_ops.load(vm.qmp, snapshot, ignore_shared, self.settings.restore_timeout, proc.exited)
        except VmmError as exc:
            why = f" ({describe_exit(proc.exit_status)})" if not proc.alive else ""
            raise VmmError(f"{exc}{why}{self._qemu_log_tail(vm_id)}") from exc
        faults.point(f"{purpose}.loaded")

    async def _stop_qemu(self, vm: _Vm, why: str = "the VM's QEMU stopped") -> None:
        vm.expect_exit = True
        if vm.agent is not None:
            await vm.agent.close(why)
            vm.agent = None
        if vm.qmp is not None:
            await vm.qmp.disconnect_quietly()
            vm.qmp = None
        if vm.proc is not None:
            await vm.proc.kill()
            self._forget_process(vm.proc.pid)
            vm.proc = None
        if vm.console is not None:
            await vm.console.close(drain=True)  # QEMU has ended: its last bytes (an app's dying words) are kept
            vm.console = None
        vm.rec.pid = None

    async def _discard(self, vm: _Vm, why: str) -> None:
        """End every process of the VM and remove its namespace and files; keep its record as terminated.

        Each step is tried even if an earlier one failed.
        """
        vm_id = vm.rec.id
        self._record(vm, VmState.TERMINATING)
        steps: tuple[tuple[str, Callable[[], Awaitable[None]]], ...] = (
            ("cut the guest's connections", lambda: netns.cut_guest(vm_id)),
            ("stop QEMU", lambda: self._stop_qemu(vm, f"VM {vm_id} is terminated: {why}")),
            ("end every other QEMU", lambda: self._kill_strays(vm_id, None, qemus_by_name().get(f"mvm-{vm_id}", []))),
            ("stop the egress proxy", lambda: self._close_egress(vm_id)),
            ("delete the namespace", lambda: netns.delete(vm_id)),
            ("release its uid and cgroup", lambda: self.jail.release(vm_id, self.vm_dir(vm_id))),
        )
        for what, step in steps:
            try:
                await step()
            except (VmmError, OSError) as exc:
                log.event("vm.delete_step_failed", level="warning", vm=vm_id, step=what, error=str(exc))
        shutil.rmtree(self.vm_dir(vm_id), ignore_errors=True)
        self._vms.pop(vm_id, None)
        self._dirty.discard(vm_id)
        self._unsaved.discard(vm_id)
        self._record(vm, VmState.TERMINATED, reason=why)
        self._terminated[vm_id] = vm.rec

    def _on_exit(self, vm: _Vm, proc: QemuProcess, status: int | None) -> None:
        """QEMU ended: settled under the VM's lock, after any transition that is watching it."""
        asyncio.get_running_loop().create_task(self._settle_exit(vm, proc, status))

    async def _settle_exit(self, vm: _Vm, proc: QemuProcess, status: int | None) -> None:
        """If nobody asked QEMU to end, the VM is failed and says why."""
        async with vm.lock:
            if vm.proc is not proc or vm.expect_exit:
                return
            await self._stop_qemu(vm)
            await self._close_egress(vm.rec.id)
            with contextlib.suppress(VmmError):
                await netns.cut_guest(vm.rec.id)
            vm_dir = self.vm_dir(vm.rec.id)
            reason = f"{describe_exit(status)}{self._qemu_log_tail(vm.rec.id)}{guest_log_tail(vm_dir, 3)}"
            reason = self.jail.oom_reason(vm.rec.id) or reason
            self._record(vm, VmState.FAILED, reason=reason)
        log.event("vm.failed", level="error", vm=vm.rec.id, reason=reason)

    # ---- restart recovery ---------------------------------------------------------------

    async def _recover(self, vm: _Vm, found: list[int]) -> None:
        """Settle a VM after a restart: re-adopt the QEMU that runs it, end every other one, tidy its files.

        A transition cut short by a crash leaves one of: a QEMU loading a snapshot (restore),
        a QEMU moving RAM (first suspend), a paused QEMU whose snapshot is incomplete, or
        temporary files. The snapshot is trusted only if it is complete; otherwise the VM's
        QEMU is kept (paused) so nothing of its memory is lost.
        """
        rec = vm.rec
        vm_dir = self.vm_dir(rec.id)
        _tidy_snapshot_files(vm_dir, rec.ram_mode)
        snapshot_kept = (vm_dir / STATE).exists()
        runner = rec.pid if rec.pid in found else None
        keeps = rec.state in (*_LIVE, VmState.PENDING) or (rec.state is VmState.SUSPENDING and not snapshot_kept)
        keep = runner if keeps else None
        was = rec.state
        await self._kill_strays(rec.id, keep, found)
        proc = QemuProcess.adopt(keep, f"mvm-{rec.id}", lambda p, st: self._on_exit(vm, p, st)) if keep else None
        run_state = None
        if proc is not None:
            vm.proc = proc
            try:
                vm.qmp = await qmp_ops.connect(
                    vm_dir / QMP_SOCKET, f"mvm-{rec.id}", QMP_CONNECT_TIMEOUT, lambda: proc.alive
                )
                run_state = await qmp_ops.status(vm.qmp)
            except (VmmError, QMPError, OSError, TimeoutError):
                run_state = None
        if run_state in ("running", "paused", "postmigrate"):
            _remove_snapshot(vm_dir)  # the guest ran on (or may): a snapshot left over no longer matches
            with contextlib.suppress(VmmError):  # a suspend cut short may have cut its connections
                await netns.uncut_guest(rec.id)
            await self._open_egress(vm)
            if (vm_dir / OVERLAY).exists():
                await self._open_console(vm)
                await self._connect_agent(vm)
        if run_state == "running":
            self._record(vm, VmState.RUNNING, recovered=True)
        elif run_state in ("paused", "postmigrate"):
            why = None if was in _LIVE else f"manager restarted during {was.value}"
            self._record(vm, VmState.PAUSED, reason=why, recovered=True)
        elif rec.state in (VmState.SUSPENDED, VmState.FAILED):
            pass
        else:
            await self._stop_qemu(vm)
            if was in (VmState.RESTORING, VmState.SUSPENDING) and snapshot_kept:
                self._record(vm, VmState.SUSPENDED, reason=f"manager restarted during {was.value}", recovered=True)
            else:
                reason = f"QEMU was gone when the manager restarted ({was.value})"
                self._record(vm, VmState.FAILED, reason=reason, recovered=True)
        log.event("vm.recovered", vm=rec.id, state=vm.rec.state.value, adopted=run_state is not None, was=was.value)

    # ---- helpers ------------------------------------------------------------------------

    def _vm(self, vm_id: str) -> _Vm:
        vm = self._vms.get(vm_id)
        if vm is None:
            raise NotFound(f"VM {vm_id!r} does not exist")
        return vm

    def _require(self, vm: _Vm, *states: VmState) -> None:
        if vm.rec.state not in states:
            wanted = " or ".join(s.value for s in states)
            raise Conflict(f"VM {vm.rec.id} is {vm.rec.state.value}, not {wanted}")

    async def _qmp(self, vm: _Vm, command: str) -> None:
        if vm.qmp is None:
            raise VmFailed(f"VM {vm.rec.id} has no running QEMU")
        try:
            await vm.qmp.execute(command)
        except (QMPError, OSError) as exc:
            raise VmFailed(f"QMP {command} on VM {vm.rec.id} failed: {exc}") from exc

    def _set(self, vm: _Vm, state: VmState, reason: str | None = None) -> None:
        """Make a transition (checked against the lifecycle table): recorded first; if the registry
        cannot take it, it is undone in memory too."""
        lifecycle.check(vm.rec.state, state)
        before = (vm.rec.state, vm.rec.reason, vm.rec.state_changed_at)
        vm.rec.state, vm.rec.reason, vm.rec.state_changed_at = state, reason, time.time()
        try:
            self._store(vm)
        except (sqlite3.Error, OSError) as exc:
            vm.rec.state, vm.rec.reason, vm.rec.state_changed_at = before
            log.event("vm.registry_write_failed", level="error", vm=vm.rec.id, state=state.value, error=str(exc))
            raise RegistryError(
                f"VM {vm.rec.id} stays {before[0].value}: the registry could not record it as {state.value}: {exc}"
            ) from exc
        self._notify(vm.rec)

    def _record(self, vm: _Vm, state: VmState, reason: str | None = None, recovered: bool = False) -> None:
        """Record what already happened (QEMU is gone, a snapshot is complete): it stays true in memory
        even if the registry write fails, and the flusher writes it once it can. Checked against the
        lifecycle table; `recovered`: what recovery found after a restart, whatever the record said."""
        lifecycle.check(vm.rec.state, state, recovered)
        vm.rec.state, vm.rec.reason, vm.rec.state_changed_at = state, reason, time.time()
        try:
            self._store(vm)
            self._unsaved.discard(vm.rec.id)
        except (sqlite3.Error, OSError) as exc:
            self._unsaved.add(vm.rec.id)
            log.event("vm.registry_write_failed", level="error", vm=vm.rec.id, state=state.value, error=str(exc),
                      retry=True)  # fmt: skip
        self._notify(vm.rec)

    def _store(self, vm: _Vm) -> None:
        if self._registry is not None:
            self._registry.save(vm.rec)

    def _notify(self, rec: VmRecord) -> None:
        for listener in self.listeners:
            listener(rec)

    def _qemu_log_tail(self, vm_id: str) -> str:
        path = self.vm_dir(vm_id) / "qemu.log"
        try:
            lines = path.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return ""
        return f" (qemu: {lines[-1]})" if lines else ""

    async def _open_egress(self, vm: _Vm) -> None:
        """The VM's egress proxy, listening in its namespace before the guest runs (again)."""
        if self.egress is None:
            return
        try:
            await self.egress.open(vm.rec.id, vm.rec.policy.egress)
        except (OSError, VmmError) as exc:  # the guest runs on without a way out, as with egress "none"
            log.event("vm.egress_unavailable", level="error", vm=vm.rec.id, error=str(exc))

    async def _close_egress(self, vm_id: str) -> None:
        if self.egress is not None:
            await self.egress.close(vm_id)

    async def _kill_strays(self, vm_id: str, keep: int | None, found: list[int]) -> None:
        """End every QEMU of the VM except `keep`: those running under its name, and those the
        registry recorded (if their start time says they are still the same processes)."""
        intents = self._registry.processes(vm_id) if self._registry is not None else []
        pids = set(found) | {i.pid for i in intents if start_ticks(i.pid) == i.start_ticks}
        purposes = {i.pid: i.purpose for i in intents}
        for pid in sorted(pids - {keep} if keep is not None else pids):
            await kill_pid(pid)
            log.event("vm.orphan_killed", level="warning", vm=vm_id, pid=pid, purpose=purposes.get(pid, "unknown"))
        for intent in intents:
            if intent.pid != keep:
                self._forget_process(intent.pid)

    def _forget_process(self, pid: int) -> None:
        """The process ended: its write-ahead record goes (a stale one is harmless, its start time differs)."""
        if self._registry is not None:
            with contextlib.suppress(sqlite3.Error, OSError):
                self._registry.remove_process(pid)

    def _check_room_to_suspend(self, vm: _Vm, tpl: Template) -> None:
        """Refuse a suspend the disk cannot hold, while the VM still runs.

        A first suspend writes every page the guest uses twice (the stream, then the VM's own
        RAM file); later ones write device state only. Running out of space half-way would
        kill the QEMU writing RAM (SIGBUS) or fail the registry write.
        """
        vm_dir = self.vm_dir(vm.rec.id)
        needs = SUSPEND_ROOM
        if vm.rec.ram_mode is RamMode.TEMPLATE_COW:
            ram = Path(tpl.path) / RAM
            used = disks.allocated_bytes(ram) + _private_dirty(vm.proc.pid if vm.proc else None, ram)
            needs += 2 * min(used, tpl.memory_mb << 20)
        free = shutil.disk_usage(vm_dir).free
        if free < needs:
            raise OverCapacity(
                f"not enough disk space to suspend VM {vm.rec.id}: it needs about {needs >> 20} MiB free in "
                f"{vm_dir} and {free >> 20} MiB are; the VM keeps running (free space, then suspend again)"
            )

    def _purge_terminated(self) -> None:
        """Records of terminated VMs go after vmm.terminated_ttl."""
        cutoff = time.time() - self.settings.terminated_ttl
        for vm_id, rec in list(self._terminated.items()):
            if rec.state_changed_at < cutoff:
                try:
                    if self._registry is not None:
                        self._registry.delete(vm_id)
                except (sqlite3.Error, OSError):
                    return
                del self._terminated[vm_id]

    def _flush_activity(self) -> None:
        if self._registry is None:
            return
        for vm_id in list(self._unsaved):
            rec = self._vms[vm_id].rec if vm_id in self._vms else self._terminated.get(vm_id)
            try:
                if rec is not None:
                    self._registry.save(rec)
                self._unsaved.discard(vm_id)
            except (sqlite3.Error, OSError):
                break
        if self._dirty:
            with contextlib.suppress(sqlite3.Error, OSError):
                self._registry.save_activity(self._vms[i].rec for i in self._dirty if i in self._vms)
                self._dirty.clear()
        self._purge_terminated()

    async def _flush_activity_forever(self) -> None:
        while True:
            await asyncio.sleep(ACTIVITY_FLUSH_SECONDS)
            self._flush_activity()

    async def _rotate_app_logs_forever(self) -> None:
        """Logs QEMU appends to itself (an initramfs guest's serial.log, the app.log of a QEMU started
        before console sockets) hold their bound only as promptly as they are checked (vmm/applog.py)."""
        while True:
            await asyncio.sleep(APP_LOG_CHECK_SECONDS)
            self._rotate_app_logs()

    def _rotate_app_logs(self) -> None:
        for vm in list(self._vms.values()):
            if vm.rec.state in _LIVE and vm.console is None:  # a console reader keeps its log bounded itself
                try:
                    self.app_log(vm.rec.id).rotate_if_needed()
                except (OSError, VmmError) as exc:
                    log.event("vm.log_rotate_failed", level="warning", vm=vm.rec.id, error=str(exc))


def _private_dirty(pid: int | None, mapped: Path) -> int:
    """Bytes a process has written to its private (copy-on-write) mapping of `mapped`."""
    if pid is None:
        return 0
    try:
        smaps = Path(f"/proc/{pid}/smaps").read_text()
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


def _remove_snapshot(vm_dir: Path) -> None:
    """The snapshot and its checksum, once the guest has run on past it."""
    (vm_dir / STATE).unlink(missing_ok=True)
    snapshot_check.remove(vm_dir / STATE)


def _finish_ram_move(vm_dir: Path) -> None:
    """The device state saved by the RAM move replaces the full stream (checksum first)."""
    snapshot_check.sidecar(vm_dir / STATE_DEV).rename(snapshot_check.sidecar(vm_dir / STATE))
    (vm_dir / STATE_DEV).rename(vm_dir / STATE)


def _tidy_snapshot_files(vm_dir: Path, ram_mode: RamMode) -> None:
    """Temporary files of a transition cut short: finished if the registry says it got that far, else removed.

    Every snapshot writer (qmp.save, snapshot_check.write) writes `*.tmp` first and renames it.
    """
    for tmp in vm_dir.glob("*.tmp"):
        tmp.unlink(missing_ok=True)
    if (vm_dir / STATE_DEV).exists():
        if ram_mode is RamMode.OWN_FILE and snapshot_check.sidecar(vm_dir / STATE_DEV).exists():
            _finish_ram_move(vm_dir)
        else:
            (vm_dir / STATE_DEV).unlink()
            snapshot_check.remove(vm_dir / STATE_DEV)
