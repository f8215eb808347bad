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
import fcntl
import os
import secrets
import shutil
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from qemu.qmp.error import QMPError

from . import accel as accel_mod
from . import disks, netns, template
from . import qmp as qmp_ops
from .agent import Agent, AgentError, Exec, load_key
from .applog import AppLog
from .errors import Conflict, InvalidRequest, NotFound, RestoreFailed, VmFailed, VmmError
from .hooks import HookOutcome, Hooks, call_http, check_payload
from .image import Image, list_images, remove_image
from .jsonlog import log
from .model import RamMode, Template, VmRecord, VmState
from .policy import Policy
from .qemu import (
    AGENT_SOCKET,
    APP_LOG,
    QEMU_LOG,
    QMP_SOCKET,
    SERIAL_LOG,
    DiskBacking,
    QemuProcess,
    RamBacking,
    build_argv,
    describe_exit,
)
from .registry import Registry
from .settings import VmmSettings
from .template import guest_log_tail

_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
QMP_CONNECT_TIMEOUT = 10.0
ACTIVITY_FLUSH_SECONDS = 2.0
SYNC_SKEW_MS = 5.0  # a guest clock further off than this after a sync is synced once more
GUEST_TOOL = "/mvm/init"  # also the guest's file and hook tool (guest/init)
OVERLAY = "disk.qcow2"  # the VM's own writes, over its template's read-only base disk
AGENT_KEY = "agent.key"  # the VM's key for its guest agent (0600)
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
        self.agent: Agent | None = None  # disk images only
        self.busy = 0  # execs running: the idle reaper leaves the VM alone


class VmManager:
    """Creates, pauses, suspends, restores and deletes VMs; the edge's VmBackend."""

    def __init__(self, settings: VmmSettings) -> None:
        self.settings = settings
        self.accel = accel_mod.choose(settings.accelerator)
        self.listeners: list[Callable[[VmRecord], None]] = []
        self._vms: dict[str, _Vm] = {}
        self._dirty: set[str] = set()
        self._registry: Registry | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None
        self._building: set[str] = set()

    # ---- start and stop -------------------------------------------------------------

    async def start(self) -> None:
        """Open the registry and take back every VM an earlier manager left behind."""
        self.settings.vms_dir.mkdir(parents=True, exist_ok=True)
        self._lock_state_dir()
        self._registry = Registry(self.settings.registry_path)
        for rec in self._registry.load_all():
            vm = _Vm(rec)
            self._vms[rec.id] = vm
            await self._recover(vm)
        self._flusher = asyncio.create_task(self._flush_activity_forever())
        log.event("vmm.started", accelerator=self.accel.name, vms=len(self._vms))

    async def close(self) -> None:
        """Stop managing: running VMs keep running (re-adopted later) or are suspended."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        for vm in list(self._vms.values()):
            if self.settings.on_shutdown == "suspend" and vm.rec.state in _LIVE:
                with contextlib.suppress(VmmError):
                    await self.suspend(vm.rec.id)
            if vm.qmp is not None:
                await vm.qmp.disconnect_quietly()
            if vm.agent is not None:
                await vm.agent.close("the manager stopped")
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
        path = self.settings.state_dir / "manager.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise Conflict(
                f"state directory {self.settings.state_dir} is in use by pid {holder} (is `mvm serve` already "
                "running?); one manager per state directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    # ---- queries (the edge's hot path: in memory only) ------------------------------

    def lookup(self, vm_id: str) -> VmRecord | None:
        vm = self._vms.get(vm_id)
        return vm.rec if vm is not None else None

    def get(self, vm_id: str) -> VmRecord:
        return self._vm(vm_id).rec

    def list_vms(self) -> list[VmRecord]:
        return [vm.rec for vm in self._vms.values()]

    def counts_by_state(self) -> dict[str, int]:
        counts = Counter(vm.rec.state.value for vm in self._vms.values())
        return {state.value: counts.get(state.value, 0) for state in VmState if state != VmState.TERMINATED}

    def touch(self, vm_id: str) -> None:
        vm = self._vms.get(vm_id)
        if vm is not None:
            vm.rec.last_activity = time.time()
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
        """Work on the VM (an exec) is under way: it counts as activity throughout."""
        vm = self._vm(vm_id)
        vm.busy += 1
        try:
            yield
        finally:
            vm.busy -= 1
            self.touch(vm_id)

    def busy_count(self, vm_id: str) -> int:
        vm = self._vms.get(vm_id)
        return vm.busy if vm is not None else 0

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
        pol = Policy.from_dict(policy or {}, base=self.settings.default_policy)
        if tpl.memory_mb > pol.memory_mb or tpl.vcpus > pol.vcpus or tpl.disk_mb > pol.disk_mb:
            raise InvalidRequest(
                f"template {tpl.name!r} needs {tpl.memory_mb} MiB, {tpl.vcpus} vCPU(s) and a {tpl.disk_mb} MiB disk, "
                f"above the policy's limits policy.memory_mb={pol.memory_mb} / policy.vcpus={pol.vcpus} / "
                f"policy.disk_mb={pol.disk_mb} (a snapshot fixes a VM's size: use a smaller template)"
            )
        now = time.time()
        vm_id = new_vm_id()
        rec = VmRecord(vm_id, tpl.name, VmState.STARTING, pol, tpl.app_port, now, now, state_changed_at=now)
        vm = _Vm(rec)
        self._vms[vm_id] = vm
        self._store(vm)
        async with vm.lock:
            try:
                self.vm_dir(vm_id).mkdir(parents=True)
                if tpl.base_disk is not None:
                    await disks.create_overlay(tpl.base_disk, self.vm_dir(vm_id) / OVERLAY)
                    # The app started while the template booted: its first lines belong to every VM's log.
                    with contextlib.suppress(FileNotFoundError):
                        shutil.copyfile(Path(tpl.path) / APP_LOG, self.vm_dir(vm_id) / APP_LOG)
                await netns.create(vm_id)
                ram = RamBacking(Path(tpl.path) / "ram", share=False)
                await self._start_qemu(vm, tpl, ram, Path(tpl.path) / "state", ignore_shared=True)
                await self._run_hook(vm, "run", payload)
            except BaseException as exc:
                await self._discard(vm)
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
            self._set(vm, VmState.PAUSED)
        log.event("vm.paused", vm=vm_id)
        return vm.rec

    async def resume(self, vm_id: str) -> VmRecord:
        """Run a paused or suspended VM again (shares any wake already under way).

        Counts as activity, so the idle reaper does not put it straight back to sleep.
        """
        await self.ensure_running(vm_id)
        self.touch(vm_id)
        return self._vm(vm_id).rec

    async def ensure_running(self, vm_id: str) -> bool:
        """Single-flight wake: every concurrent caller awaits the same task. True if it had to wake."""
        vm = self._vm(vm_id)
        if vm.rec.state is VmState.RUNNING:
            return False
        if vm.wake is None or vm.wake.done():
            vm.wake = asyncio.create_task(self._wake(vm))
        await asyncio.shield(vm.wake)
        return True

    async def suspend(self, vm_id: str) -> VmRecord:
        """Snapshot to disk and end the QEMU process; its memory is freed."""
        vm = self._vm(vm_id)
        async with vm.lock:
            if vm.rec.state is VmState.SUSPENDED:
                return vm.rec
            self._require(vm, *_LIVE)
            await self._suspend_locked(vm)
        return vm.rec

    async def delete(self, vm_id: str) -> None:
        """Terminate the VM and remove everything it had: process, namespace, files, record."""
        vm = self._vm(vm_id)
        async with vm.lock:
            if vm.rec.state is VmState.RUNNING:
                await self._run_hook(vm, "terminate")
            await self._discard(vm)
        log.event("vm.deleted", vm=vm_id)

    # ---- transitions (called with vm.lock held) --------------------------------------

    async def _wake(self, vm: _Vm) -> None:
        async with vm.lock:
            state = vm.rec.state
            if state is VmState.RUNNING:
                return
            if state is VmState.PAUSED:
                await self._qmp(vm, "cont")
                self._set(vm, VmState.RUNNING)
                await self._sync_guest(vm)  # its clock stood still while it was paused
                log.event("vm.resumed", vm=vm.rec.id)
            elif state is VmState.SUSPENDED:
                await self._restore(vm)
            elif state is VmState.FAILED:
                raise VmFailed(f"VM {vm.rec.id} has failed: {vm.rec.reason}")
            else:
                raise Conflict(f"VM {vm.rec.id} is {state.value}")

    async def _suspend_locked(self, vm: _Vm) -> None:
        started = time.monotonic()
        was = vm.rec.state
        path = self.vm_dir(vm.rec.id) / "state"
        # Own-file RAM is already on disk; copy-on-write RAM must go into the stream.
        ignore_shared = vm.rec.ram_mode is RamMode.OWN_FILE
        if was is VmState.RUNNING:
            await self._run_hook(vm, "suspend")
        self._set(vm, VmState.SUSPENDING)
        try:
            if was is VmState.RUNNING:
                await self._qmp(vm, "stop")
            assert vm.qmp is not None
            size = await qmp_ops.save(vm.qmp, path, ignore_shared, self.settings.restore_timeout)
        except BaseException as exc:
            await self._undo_suspend(vm, was)
            if isinstance(exc, Exception):
                raise VmmError(f"suspend of VM {vm.rec.id} failed, it stays {vm.rec.state.value}: {exc}") from exc
            raise
        # The snapshot is complete: from here the VM is suspended, whatever happens next.
        try:
            await self._stop_qemu(vm, f"VM {vm.rec.id} was suspended")
            if not ignore_shared:
                size = await self._move_ram_to_own_file(vm, size)
        finally:
            self._set(vm, VmState.SUSPENDED)
        log.event("vm.suspended", vm=vm.rec.id, ms=round((time.monotonic() - started) * 1000, 1), bytes=size)

    async def _undo_suspend(self, vm: _Vm, was: VmState) -> None:
        """A suspend that did not complete: back to what the VM was, or failed if that is impossible."""
        if vm.proc is None or not vm.proc.alive:
            if vm.rec.state is VmState.SUSPENDING:
                self._set(vm, VmState.FAILED, reason="QEMU exited during a suspend")
            return
        self._set(vm, was)
        if was is VmState.RUNNING:
            try:
                await self._qmp(vm, "cont")
            except VmFailed as exc:
                await self._stop_qemu(vm)
                self._set(vm, VmState.FAILED, reason=f"could not resume after a failed suspend: {exc}")

    async def _move_ram_to_own_file(self, vm: _Vm, stream_size: int) -> int:
        """Turn a clone's full-RAM stream into the VM's own RAM file plus device state.

        Done once, at the first suspend, so that no wake ever pays for loading RAM: the stream
        is loaded into a new shared file and the device state saved again without RAM. On
        failure the full stream stays and the VM still restores from it (more slowly). The
        registry learns the new RAM mode before the device-state file replaces the stream, so
        a crash in between never pairs a RAM-less snapshot with "RAM is in the stream".
        """
        vm_dir = self.vm_dir(vm.rec.id)
        ram = RamBacking(vm_dir / "ram", share=True)
        ram.path.unlink(missing_ok=True)
        try:
            tpl = template.load(self.settings, vm.rec.template)
            await self._spawn_and_load(vm, tpl, ram, vm_dir / "state", ignore_shared=False)
            assert vm.qmp is not None
            size = await qmp_ops.save(vm.qmp, vm_dir / "state.dev", True, self.settings.restore_timeout)
        except (VmmError, QMPError, OSError, TimeoutError) as exc:
            ram.path.unlink(missing_ok=True)
            log.event("vm.ram_move_failed", level="warning", vm=vm.rec.id, error=str(exc))
            return stream_size
        finally:
            await self._stop_qemu(vm)
        vm.rec.ram_mode = RamMode.OWN_FILE
        self._store(vm)
        (vm_dir / "state.dev").rename(vm_dir / "state")
        return size

    async def _restore(self, vm: _Vm) -> None:
        started = time.monotonic()
        vm_dir = self.vm_dir(vm.rec.id)
        own_file = vm.rec.ram_mode is RamMode.OWN_FILE
        ram = RamBacking(vm_dir / "ram", share=True)
        if not own_file:
            # The stream carries all RAM; it is loaded into a fresh file the VM owns from now on.
            ram.path.unlink(missing_ok=True)
        self._set(vm, VmState.RESTORING)
        try:
            tpl = template.load(self.settings, vm.rec.template)
            if not netns.exists(vm.rec.id):
                await netns.create(vm.rec.id)
            await self._start_qemu(vm, tpl, ram, vm_dir / "state", ignore_shared=own_file)
        except BaseException as exc:
            await self._stop_qemu(vm)
            if not own_file:
                ram.path.unlink(missing_ok=True)
            self._set(vm, VmState.SUSPENDED, reason=f"restore failed: {exc}")
            log.event("vm.restore_failed", level="error", vm=vm.rec.id, error=str(exc))
            if isinstance(exc, Exception):
                raise RestoreFailed(f"restore of VM {vm.rec.id} failed; it stays suspended: {exc}") from exc
            raise
        # The snapshot no longer matches the RAM file the guest now writes to.
        (vm_dir / "state").unlink(missing_ok=True)
        vm.rec.ram_mode = RamMode.OWN_FILE
        self._store(vm)
        await self._run_hook(vm, "resume")
        log.event("vm.restored", vm=vm.rec.id, ms=round((time.monotonic() - started) * 1000, 1))

    async def _start_qemu(self, vm: _Vm, tpl: Template, ram: RamBacking, snapshot: Path, ignore_shared: bool) -> None:
        """Spawn QEMU, load `snapshot`, mark RUNNING, `cont`, then make the guest safe to use."""
        await self._spawn_and_load(vm, tpl, ram, snapshot, ignore_shared)
        self._set(vm, VmState.RUNNING, reason=None)
        await self._qmp(vm, "cont")
        if tpl.base_disk is not None:
            await self._connect_agent(vm)
            await self._sync_guest(vm)

    async def _connect_agent(self, vm: _Vm) -> None:
        try:
            vm_dir = self.vm_dir(vm.rec.id)
            vm.agent = await Agent.connect(vm_dir / AGENT_SOCKET, load_key(vm_dir / AGENT_KEY))
        except AgentError as exc:
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

    async def _run_hook(self, vm: _Vm, event: str, payload: bytes = b"{}") -> None:
        """The image's hook for `event`, if it has one. Failures and timeouts are logged, never raised."""
        try:
            hooks = template.load(self.settings, vm.rec.template).hooks
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
        ex = await vm.agent.exec([GUEST_TOOL, "hooks", event], [], "/", 0, 0)
        output, code = bytearray(), None
        try:
            async with asyncio.timeout(hooks.timeout(event)):
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
            if not ex.finished:
                await ex.abandon()
        text = output.decode(errors="replace").strip()
        return HookOutcome(code == 0, f"/etc/mvm/hooks/{event}.d exited {code}: {text}")

    async def _spawn_and_load(
        self, vm: _Vm, tpl: Template, ram: RamBacking, snapshot: Path, ignore_shared: bool
    ) -> None:
        """Spawn QEMU waiting for a migration and load `snapshot`; the guest stays stopped."""
        vm_id = vm.rec.id
        vm_dir = self.vm_dir(vm_id)
        spec = template.machine_spec(tpl, f"mvm-{vm_id}", self.accel)
        sock = vm_dir / QMP_SOCKET
        sock.unlink(missing_ok=True)
        disk = DiskBacking(vm_dir / OVERLAY, "qcow2") if spec.has_disk else None
        argv = build_argv(self.settings.qemu_binary, spec, ram, disk, vm_dir, incoming=True)
        vm.expect_exit = False
        proc = QemuProcess.spawn(argv, vm_id, vm_dir / QEMU_LOG, on_exit=lambda p, st: self._on_exit(vm, p, st))
        vm.proc = proc
        vm.rec.pid = proc.pid
        vm.qmp = await qmp_ops.connect(sock, spec.name, QMP_CONNECT_TIMEOUT, lambda: proc.alive)
        try:
            await qmp_ops.load(vm.qmp, snapshot, ignore_shared, self.settings.restore_timeout)
        except VmmError as exc:
            raise VmmError(f"{exc}{self._qemu_log_tail(vm_id)}") from exc

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
            vm.proc = None
        vm.rec.pid = None

    async def _discard(self, vm: _Vm) -> None:
        """Remove everything of the VM. Each step is tried even if an earlier one failed."""
        vm_id = vm.rec.id
        steps: tuple[tuple[str, Callable[[], Awaitable[None]]], ...] = (
            ("stop QEMU", lambda: self._stop_qemu(vm, f"VM {vm_id} was deleted")),
            ("delete the namespace", lambda: netns.delete(vm_id)),
        )
        for what, step in steps:
            try:
                await step()
            except (VmmError, OSError) as exc:
                log.event("vm.delete_step_failed", level="warning", vm=vm_id, step=what, error=str(exc))
        shutil.rmtree(self.vm_dir(vm_id), ignore_errors=True)
        self._vms.pop(vm_id, None)
        self._dirty.discard(vm_id)
        if self._registry is not None:
            self._registry.delete(vm_id)
        vm.rec.state = VmState.TERMINATED
        self._notify(vm.rec)

    def _on_exit(self, vm: _Vm, proc: QemuProcess, status: int | None) -> None:
        """QEMU ended. If nobody asked it to, the VM is failed and says why."""
        if vm.proc is not proc or vm.expect_exit:
            return
        vm.proc = None
        vm.rec.pid = None
        if vm.qmp is not None:
            asyncio.get_running_loop().create_task(vm.qmp.disconnect_quietly())
            vm.qmp = None
        if vm.agent is not None:
            asyncio.get_running_loop().create_task(vm.agent.close(f"VM {vm.rec.id} failed: {describe_exit(status)}"))
            vm.agent = None
        reason = f"{describe_exit(status)}{self._qemu_log_tail(vm.rec.id)}{guest_log_tail(self.vm_dir(vm.rec.id), 3)}"
        self._set(vm, VmState.FAILED, reason=reason)
        log.event("vm.failed", level="error", vm=vm.rec.id, reason=reason)

    # ---- restart recovery ---------------------------------------------------------------

    async def _recover(self, vm: _Vm) -> None:
        """Re-adopt a QEMU that is still running, or settle the record on what is on disk."""
        rec = vm.rec
        if rec.state not in (*_LIVE, VmState.STARTING, VmState.SUSPENDING, VmState.RESTORING):
            return
        proc = QemuProcess.adopt(rec.pid, f"mvm-{rec.id}", lambda p, st: self._on_exit(vm, p, st)) if rec.pid else None
        run_state = None
        if proc is not None:
            vm.proc = proc
            try:
                vm.qmp = await qmp_ops.connect(
                    self.vm_dir(rec.id) / "qmp.sock", f"mvm-{rec.id}", QMP_CONNECT_TIMEOUT, lambda: proc.alive
                )
                run_state = await qmp_ops.status(vm.qmp)
            except (VmmError, QMPError, OSError, TimeoutError):
                run_state = None
        if run_state in ("running", "paused", "postmigrate") and (self.vm_dir(rec.id) / OVERLAY).exists():
            await self._connect_agent(vm)
        if run_state == "running":
            self._set(vm, VmState.RUNNING)
        elif run_state in ("paused", "postmigrate"):
            self._set(vm, VmState.PAUSED)
        else:
            await self._stop_qemu(vm)
            snapshot_kept = (self.vm_dir(rec.id) / "state").exists()
            if rec.state in (VmState.RESTORING, VmState.SUSPENDING) and snapshot_kept:
                self._set(vm, VmState.SUSPENDED, reason=f"manager restarted during {rec.state.value}")
            else:
                self._set(vm, VmState.FAILED, reason=f"QEMU was gone when the manager restarted ({rec.state.value})")
        log.event("vm.recovered", vm=rec.id, state=vm.rec.state.value, adopted=run_state is not None)

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
        vm.rec.state = state
        vm.rec.reason = reason
        vm.rec.state_changed_at = time.time()
        self._store(vm)
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

    def _flush_activity(self) -> None:
        if self._registry is not None and self._dirty:
            self._registry.save_activity(self._vms[i].rec for i in self._dirty if i in self._vms)
        self._dirty.clear()

    async def _flush_activity_forever(self) -> None:
        while True:
            await asyncio.sleep(ACTIVITY_FLUSH_SECONDS)
            self._flush_activity()
            self._rotate_app_logs()

    def _rotate_app_logs(self) -> None:
        for vm in list(self._vms.values()):
            if vm.rec.state in _LIVE:
                try:
                    self.app_log(vm.rec.id).rotate_if_needed()
                except (OSError, VmmError) as exc:
                    log.event("vm.log_rotate_failed", level="warning", vm=vm.rec.id, error=str(exc))
