"""The VM manager: the facade the edge, the control API and the fleet call (their VmBackend).

It holds the parts and serialises each VM's transitions: one lock per VM and at most one wake
task that all concurrent callers share, so twenty requests to a suspended VM cause one restore.
The parts, each with one job:
- vmm.lifecycle: the one transition table every state change is checked against;
- vmm.transitions: launch, pause, wake, delete; vmm.snapshots: suspend, restore, the RAM move;
- vmm.runtime: QEMU processes and their exits, the guest agent and console, namespace and egress;
- vmm.recovery: settling each VM after a restart; vmm.hook_runner: the image's hooks;
- vmm.records: the VMs in memory, registry writes, the activity flusher.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import accel as accel_mod
from . import checkpoints, reflink, session_template, statelock, template
from .agent import AgentError, Exec
from .applog import AppLog
from .checkpoint_ram import give_ram_file
from .checkpoints import Checkpoint, Checkpoints
from .errors import Conflict, InvalidRequest, NotFound, NotRunning, RegistryError, VmmError
from .forks import MAX_COUNT, launch_child
from .hooks import check_payload
from .image import Image, list_images, remove_image
from .jsonlog import log
from .lifecycle import Lifecycle
from .live import LiveVm
from .model import Template, VmRecord, VmState
from .network import netns
from .network.egress import EgressServer
from .open_work import OpenWork
from .records import RecordStore
from .recovery import recover
from .restore_gate import RestoreGate
from .runtime import QemuRuntime, Runtime
from .settings import VmmSettings
from .tasks import cancelled
from .transitions import Transitions, new_vm
from .usage import UsageMeter, VmUsage
from .vm_files import OVERLAY, app_log

APP_LOG_CHECK_SECONDS = 0.1  # how often each live VM's app log is checked against its bound (a stat each)
_LIVE = (VmState.RUNNING, VmState.PAUSED)


class VmManager:
    """Creates, pauses, suspends, restores and deletes VMs; the edge's VmBackend.

    `egress` serves each running VM's egress proxy (None: guests have none); `runtime` replaces the
    QEMU runtime (vmm.runtime.QemuRuntime) and its egress: unit tests hand in a fake.
    """

    def __init__(
        self, settings: VmmSettings, egress: EgressServer | None = None, lock_fd: int | None = None,
        runtime: Runtime | None = None,
    ) -> None:  # fmt: skip
        self._settings = settings
        self._given_lock = lock_fd  # the state directory's lock, taken by `mvm serve` before it started us
        self.accel = accel_mod.choose(settings.accelerator)
        self.open_work = OpenWork()  # what keeps each VM awake: counted here, or reported by edge workers
        self.records = RecordStore(settings)
        self.listeners: list[Callable[[VmRecord], None]] = self.records.listeners
        self.lifecycle = Lifecycle(self.records)
        self.runtime: Runtime = runtime or QemuRuntime(settings, self.accel, self.records, egress)
        self.transitions = Transitions(settings, self.runtime, self.lifecycle, self.records)
        self.snapshots = self.transitions.snapshots
        self.checkpoints = Checkpoints(settings, self.runtime, self.lifecycle, self.records, self.snapshots)
        self.meter = UsageMeter()  # each VM's last CPU sample, for its CPU %
        self._background: list[asyncio.Task[None]] = []  # app-log rotation, CPU weights of busy VMs
        self.restores = RestoreGate(settings.max_concurrent_restores)  # restores at once; the rest wait in order
        self._lock_fd: int | None = None
        self._building: set[str] = set()
        self._wakes_refused = False  # the process is stopping: nothing is resumed or restored any more

    @property
    def settings(self) -> VmmSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: VmmSettings) -> None:
        """New settings for every part at once (the benchmark turns guest_sync off between cycles)."""
        self._settings = settings
        for part in (self.records, self.runtime, self.transitions, self.snapshots, self.checkpoints):
            part.settings = settings

    # ---- start and stop -------------------------------------------------------------

    async def start(self) -> None:
        """Open the registry and take back every VM an earlier manager left behind."""
        self.settings.vms_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.clone_ram == "reflink" and not reflink.supported(self.settings.vms_dir):
            raise VmmError(
                f'vmm.clone_ram = "reflink": the state directory {self.settings.state_dir} has no reflinks '
                '(it needs XFS made with reflink=1, or btrfs); use "cow" there'
            )
        self._lock_state_dir()
        self.runtime.prepare_confinement()
        running = self.runtime.running_qemus()
        h2c = self._h2c_ports()
        for rec in self.records.open():
            rec.h2c_ports = h2c.get(rec.template, ())
            vm = LiveVm(rec)
            self.records.add(vm)
            checkpoints.tidy(self.settings, rec.id)
            found = running.get(f"mvm-{rec.id}", [])
            await recover(vm, found, self.settings, self.runtime, self.lifecycle, self.transitions.qemu_lost)
            mode = checkpoints.finish_interrupted_rewind(self.vm_dir(rec.id), rec.state is VmState.SUSPENDED)
            if mode is not None:
                rec.ram_mode = mode
                self.records.write(rec)
        # Groups a killed QEMU or a crash left: no QEMU of this state directory runs but the live VMs' now.
        idle = {i for i, vm in self.records.live.items() if vm.rec.state not in _LIVE}
        await self.runtime.sweep_groups(idle | set(self.records.terminated))
        self.records.start_flusher()
        self._background = [
            asyncio.create_task(self._rotate_app_logs_forever()),
            asyncio.create_task(self.runtime.balance_cpu_forever()),
        ]
        log.event("vmm.started", accelerator=self.accel.name, vms=len(self.records.live))

    def refuse_wakes(self) -> None:
        """From now on no VM is resumed or restored, whoever asks (proxy, control API, exec):
        a stopping process must not wake a VM that its on_shutdown step is about to suspend."""
        self._wakes_refused = True

    async def close(self) -> None:
        """Stop managing: running VMs keep running (re-adopted later) or are suspended."""
        await self.records.stop_flusher()
        await cancelled(self._background)
        for vm in list(self.records.live.values()):
            if self.settings.on_shutdown == "suspend" and vm.rec.state in _LIVE:
                with contextlib.suppress(VmmError):
                    await self.suspend(vm.rec.id, "its host stopped (vmm.on_shutdown = suspend)")
            await self.runtime.let_go(vm)
        self.records.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock_state_dir(self) -> None:
        """One manager per state directory: a second one would take the first one's VMs for dead."""
        state_dir, given = self.settings.state_dir, self._given_lock
        self._lock_fd = statelock.take(state_dir) if given is None else statelock.adopt(state_dir, given)

    # ---- queries (the edge's hot path: in memory only) ------------------------------

    def _h2c_ports(self) -> dict[str, tuple[int, ...]]:
        """Each template's h2c ports, for the records loaded at start (the registry does not keep them)."""
        try:
            return {tpl.name: tpl.h2c_ports for tpl in template.list_all(self.settings)}
        except (VmmError, OSError, KeyError, ValueError) as exc:
            # a damaged template must not stop the manager: its VMs' ports stay HTTP/1.1
            log.event("vmm.templates_unreadable", level="warning", error=str(exc))
            return {}

    def lookup(self, vm_id: str) -> VmRecord | None:
        vm = self.records.live.get(vm_id)
        return vm.rec if vm is not None else None

    def get(self, vm_id: str) -> VmRecord:
        """A VM, or what is left of a terminated one (for vmm.terminated_ttl)."""
        vm = self.records.live.get(vm_id)
        if vm is not None:
            return vm.rec
        tombstone = self.records.terminated.get(vm_id)
        if tombstone is None:
            raise NotFound(f"VM {vm_id!r} does not exist")
        return tombstone

    def list_vms(self) -> list[VmRecord]:
        return [vm.rec for vm in self.records.live.values()]

    def counts_by_state(self) -> dict[str, int]:
        counts = Counter(vm.rec.state.value for vm in self.records.live.values())
        return {state.value: counts.get(state.value, 0) for state in VmState if state != VmState.TERMINATED}

    def usage(self, vm_id: str) -> VmUsage:
        """What the VM uses now (vmm.usage); a VM without a QEMU reads 0 for CPU and memory."""
        rec = self.get(vm_id)
        has_qemu = rec.state in (VmState.RUNNING, VmState.PAUSED)
        group = self.runtime.group_usage(vm_id) if has_qemu else None
        tap = self.runtime.tap_bytes(vm_id) if rec.state != VmState.TERMINATED else None
        return self.meter.read(vm_id, rec.state.value, group, self.vm_dir(vm_id), tap)

    def usage_all(self) -> list[VmUsage]:
        """Every VM's usage (per-VM Prometheus series, read at scrape time)."""
        return [self.usage(vm_id) for vm_id in list(self.records.live)]

    def touch(self, vm_id: str, at: float | None = None) -> None:
        """Activity now, or at `at` (an edge's batch); never moves the time backwards."""
        self.records.touch(vm_id, at)

    def vm_dir(self, vm_id: str) -> Path:
        return self.settings.vms_dir / vm_id

    def templates(self) -> list[Template]:
        return template.list_all(self.settings)

    def remove_template(self, name: str) -> None:
        users = [vm.rec.id for vm in self.records.live.values() if vm.rec.template == name]
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
        return app_log(self.settings, self.records.get(vm_id).rec.id)

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
        vm = self.records.get(vm_id)
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
        self.records.get(vm_id)
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

    async def guest_traffic_age(self, vm_id: str) -> float | None:
        """Seconds since bytes last moved between the guest and whoever reached it (vmm.network.netns)."""
        return await netns.guest_traffic_age(vm_id)

    # ---- lifecycle (each transition under the VM's lock) ------------------------------

    async def create_vm(
        self, template_name: str | None = None, policy: dict[str, Any] | None = None, run_payload: Any = None
    ) -> VmRecord:
        """Launch a VM from a template: copy-on-write RAM, no boot, no memory copy.

        The image's `run` hook, if it has one, gets `run_payload` (JSON, at most 16 KiB) once.
        """
        payload = check_payload(run_payload) if run_payload is not None else b"{}"
        tpl, rec = new_vm(self.settings, template_name, policy)
        vm_id, now = rec.id, rec.created_at
        vm = LiveVm(rec)
        try:
            self.records.write(rec)
        except (sqlite3.Error, OSError) as exc:
            raise RegistryError(f"could not record a new VM: {exc}") from exc
        self.records.add(vm)
        self.records.emit("created", rec)
        async with vm.lock:
            await self.transitions.launch(vm, tpl, payload)
        log.event("vm.created", vm=vm_id, template=tpl.name, ms=round((time.time() - now) * 1000, 1))
        return rec

    async def pause(self, vm_id: str) -> VmRecord:
        """Stop the vCPUs; memory stays in the QEMU process."""
        vm = self.records.get(vm_id)
        async with vm.lock:
            if vm.rec.state is VmState.PAUSED:
                return vm.rec
            await self.transitions.pause(vm)
        log.event("vm.paused", vm=vm_id)
        return vm.rec

    async def resume(self, vm_id: str) -> VmRecord:
        """Run a paused or suspended VM again (shares any wake already under way).

        Counts as activity, so the idle reaper does not put it straight back to sleep.
        """
        await self.ensure_running(vm_id, explicit=True)
        self.touch(vm_id)
        return self.records.get(vm_id).rec

    async def ensure_running(self, vm_id: str, explicit: bool = False) -> bool:
        """Wake the VM if it is not running; True if it had to wake.

        Callers at the same time are serialised by the VM's lock, and the wake looks at the
        state again under it, so the first one wakes the VM and the others find it running.
        Shielded: a caller that gives up never stops a restore halfway. Sharing one wake among
        the many requests held for a VM is the data plane's single-flight
        (`edge.proxy_context.ProxyContext.wake`), the only one.

        A request wakes a VM only if its policy has auto_resume; `explicit` (a resume call) always does.
        """
        vm = self.records.get(vm_id)
        if vm.rec.state is VmState.RUNNING:
            return False
        if self._wakes_refused:
            raise NotRunning(f"VM {vm_id} is {vm.rec.state.value} and is not woken while its host stops; try again")
        if not explicit and not vm.rec.policy.auto_resume and vm.rec.state in (VmState.PAUSED, VmState.SUSPENDED):
            raise NotRunning(
                f"VM {vm_id} is {vm.rec.state.value} and its policy has auto_resume=false: "
                f"resume it explicitly (POST /v1/vms/{vm_id}/resume or `mvm vm resume {vm_id}`)"
            )
        await asyncio.shield(self._wake(vm))
        return True

    async def _wake(self, vm: LiveVm) -> None:
        async with vm.lock:
            if vm.rec.state is not VmState.SUSPENDED or vm.moving:
                await self.transitions.wake(vm)
                return
        # A restore: bounded, in the order wakes asked. The turn is awaited without the VM's lock, so a
        # delete or an export of a VM in the queue does not wait behind other VMs' restores.
        async with self.restores.slot(vm.rec.id), vm.lock:
            await self.transitions.wake(vm)  # looks at the state again: it may have changed meanwhile

    async def confirm_running(self, vm_id: str) -> bool:
        """An edge could not reach the guest of a VM it took for running. This manager's view
        is the VM's own (no catalog in between), so this is ensure_running."""
        return await self.ensure_running(vm_id)

    async def suspend(self, vm_id: str, reason: str | None = None) -> VmRecord:
        """Snapshot to disk and end the QEMU process; its memory is freed. `reason`: why (the reaper's)."""
        vm = self.records.get(vm_id)
        async with vm.lock:
            if vm.rec.state is VmState.SUSPENDED:
                return vm.rec
            self.lifecycle.refuse_unless(vm.rec, *_LIVE)
            await self.snapshots.suspend(vm, reason)
        return vm.rec

    async def delete(self, vm_id: str, reason: str = "deleted") -> None:
        """Terminate the VM and remove everything it had: every process, namespace and file.

        `reason` stays on its terminated record (e.g. the reaper's "reached its max_lifetime").
        """
        vm = self.records.get(vm_id)
        async with vm.lock:
            self._refuse_if_depended_on(vm_id)
            await self.transitions.delete(vm, reason)
        self.meter.forget(vm_id)
        log.event("vm.deleted", vm=vm_id, reason=reason)

    # ---- checkpoints, rewind, fork (vmm.checkpoints, vmm.forks) --------------------------

    async def create_checkpoint(self, vm_id: str, name: str) -> Checkpoint:
        """Checkpoint `name` of the VM now; a running VM is paused for the capture only, a suspended one stays so."""
        vm = self.records.get(vm_id)
        async with vm.lock:
            ckpt = await self.checkpoints.capture(vm, name)
        self.records.emit("checkpoint_created", vm.rec, checkpoint=name, paused_ms=round(ckpt.paused_ms, 1))
        return ckpt

    def list_checkpoints(self, vm_id: str) -> list[Checkpoint]:
        self.records.get(vm_id)
        return checkpoints.list_for(self.settings, vm_id)

    async def delete_checkpoint(self, vm_id: str, name: str) -> None:
        """Refused (409, naming them) while other VMs or checkpoints read through it (vmm.checkpoints)."""
        vm = self.records.get(vm_id)
        async with vm.lock:
            await self.checkpoints.delete(vm, name, list(self.records.live.values()))
        self.records.emit("checkpoint_deleted", vm.rec, checkpoint=name)

    async def rewind(self, vm_id: str, name: str) -> VmRecord:
        """The same VM (id, URL, tokens) back at checkpoint `name`, running; requests wait as for a wake."""
        vm = self.records.get(vm_id)
        if self._wakes_refused:
            raise NotRunning(f"VM {vm_id} is not rewound while its host stops; try again")
        async with vm.lock:
            await self.checkpoints.rewind(vm, name)
        self.records.emit("rewound", vm.rec, checkpoint=name)
        self.touch(vm_id)
        return vm.rec

    def disk_usage(self, vm_id: str) -> dict[str, object]:
        """Bytes the VM and each of its checkpoints take on the host."""
        self.records.get(vm_id)
        return checkpoints.disk_usage(self.settings, vm_id)

    async def fork(
        self, vm_id: str, count: int, policy: dict[str, Any] | None = None, checkpoint: str | None = None
    ) -> list[VmRecord]:
        """`count` new VMs that continue from the VM's moment now (a checkpoint named fork-<ms> is taken)
        or from its checkpoint `checkpoint`. All or none: a child that fails ends every sibling."""
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
            raise InvalidRequest(f"count must be a whole number from 1 to {MAX_COUNT}, got {count!r}")
        if policy is not None and not isinstance(policy, dict):
            raise InvalidRequest("policy must be an object")
        parent = self.records.get(vm_id)
        async with parent.lock:
            if parent.rec.state in (VmState.FAILED, VmState.TERMINATING, VmState.TERMINATED):
                raise Conflict(f"VM {vm_id} is {parent.rec.state.value}: only a live VM can be forked")
            if checkpoint is None:
                ckpt = await self.checkpoints.capture(parent, f"fork-{int(time.time() * 1000)}")
                self.records.emit("checkpoint_created", parent.rec, checkpoint=ckpt.name,
                                  paused_ms=round(ckpt.paused_ms, 1))  # fmt: skip
            else:
                ckpt = checkpoints.load(self.settings, vm_id, checkpoint)
            key = (vm_id, ckpt.name)
            self.checkpoints.forking[key] = self.checkpoints.forking.get(key, 0) + 1
        try:
            children = await self._fork_children(parent, ckpt, count, policy)
            self.records.emit("forked", parent.rec, checkpoint=ckpt.name, children=[c.id for c in children])
            return children
        finally:
            self.checkpoints.forking[key] -= 1
            if not self.checkpoints.forking[key]:
                del self.checkpoints.forking[key]

    async def _fork_children(
        self, parent: LiveVm, ckpt: Checkpoint, count: int, policy: dict[str, Any] | None
    ) -> list[VmRecord]:
        tpl = template.load(self.settings, parent.rec.template)
        if not ckpt.ram_file:  # once per checkpoint, so that every child maps its RAM copy-on-write
            gate = self.checkpoints.giving_ram.setdefault((ckpt.vm_id, ckpt.name), asyncio.Lock())
            async with gate:
                ckpt = await give_ram_file(
                    self.settings, self.accel, tpl, checkpoints.load(self.settings, ckpt.vm_id, ckpt.name)
                )
        wanted = {**parent.rec.policy.to_dict(), **(policy or {})}
        children = []
        for _ in range(count):
            _, rec = new_vm(self.settings, parent.rec.template, wanted)
            try:
                self.records.write(rec)
            except (sqlite3.Error, OSError) as exc:
                raise RegistryError(f"could not record a new VM: {exc}") from exc
            child = LiveVm(rec)
            self.records.add(child)
            children.append(child)

        at_once = asyncio.Semaphore(os.cpu_count() or 1)  # a QEMU loading a snapshot keeps a core busy

        async def launch(child: LiveVm, index: int) -> None:
            async with at_once, child.lock:
                await launch_child(self.transitions, child, tpl, ckpt, index)

        outcomes = await asyncio.gather(*(launch(c, i) for i, c in enumerate(children)), return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            for child in children:
                if child.rec.id in self.records.live:
                    with contextlib.suppress(VmmError):
                        await self.delete(child.rec.id, f"a sibling's fork failed: {failed[0]}")
            raise failed[0]
        return [c.rec for c in children]

    async def create_template_from(self, name: str, vm_id: str, checkpoint: str | None = None) -> Template:
        """Template `name` from the VM's moment now (a checkpoint named template-<name> is taken) or from
        its checkpoint `checkpoint`: a configured session other VMs launch from."""
        template.check_name(name)
        if name in self._building:
            raise Conflict(f"template {name!r} is being created already")
        vm = self.records.get(vm_id)
        self._building.add(name)
        try:
            async with vm.lock:
                if checkpoint is None:
                    ckpt = await self.checkpoints.capture(vm, f"template-{name}")
                else:
                    ckpt = checkpoints.load(self.settings, vm_id, checkpoint)
            source = template.load(self.settings, vm.rec.template)
            gate = self.checkpoints.giving_ram.setdefault((ckpt.vm_id, ckpt.name), asyncio.Lock())
            async with gate:
                ckpt = await give_ram_file(self.settings, self.accel, source, checkpoints.load(
                    self.settings, ckpt.vm_id, ckpt.name))  # fmt: skip
            tpl = await session_template.create_from(self.settings, name, source, ckpt)
        finally:
            self._building.discard(name)
        log.event("template.created", template=name, from_vm=vm_id, checkpoint=ckpt.name)
        return tpl

    def _refuse_if_depended_on(self, vm_id: str) -> None:
        """A VM whose checkpoints other VMs read through is not deleted (the dependants rule, 409)."""
        others = [v for v in self.records.live.values() if v.rec.id != vm_id]
        users = sorted({u for c in checkpoints.list_for(self.settings, vm_id)
                        for u in checkpoints.dependants(self.settings, others, c)})  # fmt: skip
        if users:
            raise Conflict(f"VM {vm_id} has checkpoints in use by {', '.join(users)}: delete them first")

    # ---- moving between hosts --------------------------------------------------------

    async def begin_export(self, vm_id: str) -> tuple[VmRecord, Template, Path]:
        """A suspended VM's files may now be copied to another host; wakes are refused until end_export."""
        vm = self.records.get(vm_id)
        async with vm.lock:
            self._refuse_if_depended_on(vm_id)
            outside = checkpoints.reads_outside(self.settings, vm_id)
            if outside:
                raise Conflict(f"VM {vm_id}'s disk reads through {outside}, which does not move with it: "
                               "delete or flatten that dependency first")  # fmt: skip
            self.transitions.begin_export(vm)
        return vm.rec, template.load(self.settings, vm.rec.template), self.vm_dir(vm_id)

    async def end_export(self, vm_id: str, moved_to: str | None) -> None:
        """The copy is done: gone from here if it moved (`moved_to`), else it stays and may wake again."""
        vm = self.records.get(vm_id)
        async with vm.lock:
            vm.moving = False
            if moved_to is not None:
                await self.transitions.discard(vm, f"moved to host {moved_to}", event=False)
                self.meter.forget(vm_id)
        log.event("vm.exported", vm=vm_id, moved_to=moved_to)

    async def adopt_moved(self, rec: VmRecord, files: Path, template_created_at: float) -> VmRecord:
        """Take over a suspended VM whose files another host exported into `files` (moved into place here)."""
        await self.transitions.adopt_moved(rec, files, template_created_at)
        log.event("vm.imported", vm=rec.id, template=rec.template)
        return rec

    # ---- the apps' logs ------------------------------------------------------------------

    async def _rotate_app_logs_forever(self) -> None:
        """Logs QEMU appends to itself (an initramfs guest's serial.log, the app.log of a QEMU started
        before console sockets) hold their bound only as promptly as they are checked (vmm/applog.py)."""
        while True:
            await asyncio.sleep(APP_LOG_CHECK_SECONDS)
            self._rotate_app_logs()

    def _rotate_app_logs(self) -> None:
        for vm in list(self.records.live.values()):
            if vm.rec.state in _LIVE and vm.console is None:  # a console reader keeps its log bounded itself
                try:
                    if vm.self_appended_log is None:
                        vm.self_appended_log = app_log(self.settings, vm.rec.id)
                    vm.self_appended_log.rotate_if_needed()
                except (OSError, VmmError) as exc:
                    log.event("vm.log_rotate_failed", level="warning", vm=vm.rec.id, error=str(exc))
