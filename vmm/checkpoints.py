"""Checkpoints of a VM: named moments (memory, devices, disk) it can be rewound to and forked from.

A checkpoint is a directory `<vm>/checkpoints/<name>/`, written as `.<name>.tmp` and renamed once
complete (a crash leaves no half-written one), then sealed read-only like a template:
- `state`: the device state; with RAM in it (the VM mapped its template's RAM copy-on-write; the
  first fork gives it a RAM file, vmm.checkpoint_ram), or without (`ram` holds the guest RAM, and
  children map it copy-on-write the way clones map a template's);
- `disk.qcow2`: the VM's disk at that instant, a frozen qcow2 layer: the VM rewound to it, and
  every child forked from it, gets a new overlay backed by it (a qcow2 backing chain);
- `agent.key`: the guest agent's key the guest holds at that moment (a child wakes with it, and its
  first sync gives it a key of its own, vmm.forks).
A running VM is paused only for the capture (`stop`, save, copy, `cont`); a suspended one is
copied from its snapshot files without a wake.

The dependants rule: a checkpoint whose disk layer another VM's disk (or another checkpoint)
reads through, or whose RAM a child still maps, cannot be deleted, nor can its VM: 409 lists them.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson

from . import disks, faults, jail, snapshot_check
from . import qmp as qmp_ops
from .agent import copy_key
from .errors import Conflict, InvalidRequest, NotFound, OverCapacity, VmmError
from .jsonlog import log
from .lifecycle import Lifecycle
from .live import LiveVm
from .model import RamMode, VmState
from .phases import Phases
from .records import RecordStore
from .runtime import Runtime
from .settings import VmmSettings
from .snapshots import Snapshots
from .vm_files import AGENT_KEY, CHECKPOINTS, OVERLAY, RAM, STATE

META = "checkpoint.json"
ORIGIN = "origin.json"  # in a forked child's directory: its parent and checkpoint
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_UNDO = ".rewind-undo"  # a rewind's VM files, set aside until the rewound VM runs
_ASIDE_DONE = ".complete"  # in _UNDO: every file of the VM's is there


@dataclass(frozen=True)
class Checkpoint:
    """One named moment of a VM."""

    vm_id: str
    name: str
    created_at: float
    ram_file: bool  # the RAM is a file of its own (children map it); else it is in `state`
    path: Path
    paused_ms: float = 0.0  # how long the VM stood still for the capture (0: it was suspended)

    @property
    def disk(self) -> Path:
        return self.path / OVERLAY

    def size_bytes(self) -> int:
        """Bytes it takes on the host (sparse holes not counted; a state hard-linked with the VM's counted)."""
        return sum(disks.allocated_bytes(p) for p in self.path.iterdir() if p.is_file())

    def to_dict(self) -> dict[str, object]:
        return {"vm": self.vm_id, "name": self.name, "created_at": self.created_at, "bytes": self.size_bytes(),
                "ram_file": self.ram_file, "paused_ms": self.paused_ms}  # fmt: skip


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidRequest(f"checkpoint name {name!r} must match {NAME_RE.pattern}")
    return name


def root(settings: VmmSettings, vm_id: str) -> Path:
    return settings.vms_dir / vm_id / CHECKPOINTS


def load(settings: VmmSettings, vm_id: str, name: str) -> Checkpoint:
    path = root(settings, vm_id) / check_name(name)
    try:
        data = orjson.loads((path / META).read_bytes())
    except FileNotFoundError:
        raise NotFound(f"VM {vm_id} has no checkpoint {name!r}") from None
    return Checkpoint(vm_id, name, data["created_at"], (path / RAM).exists(), path, data.get("paused_ms", 0.0))


def list_for(settings: VmmSettings, vm_id: str) -> list[Checkpoint]:
    base = root(settings, vm_id)
    if not base.is_dir():
        return []
    names = sorted(p.parent.name for p in base.glob(f"*/{META}") if not p.parent.name.startswith("."))
    return sorted((load(settings, vm_id, n) for n in names), key=lambda c: c.created_at)


def tidy(settings: VmmSettings, vm_id: str) -> None:
    """Captures a crash cut short: removed (a checkpoint exists only once renamed into place)."""
    for tmp in root(settings, vm_id).glob(".*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def origin(settings: VmmSettings, vm_id: str) -> dict[str, str] | None:
    try:
        data = orjson.loads((settings.vms_dir / vm_id / ORIGIN).read_bytes())
    except FileNotFoundError:
        return None
    return data if isinstance(data, dict) else None


def dependants(settings: VmmSettings, vms: Iterable[LiveVm], ckpt: Checkpoint) -> list[str]:
    """What reads `ckpt` still: VMs whose disk (or whose checkpoints' disks) read through its layer, and
    children that map its RAM (until their first suspend gives them a RAM file of their own)."""
    layer = ckpt.disk.resolve()
    found = []
    for vm in vms:
        vm_id = vm.rec.id
        if layer in {p.resolve() for p in disks.backing_chain(settings.vms_dir / vm_id / OVERLAY)}:
            found.append(f"VM {vm_id}")
        else:
            came = origin(settings, vm_id)
            from_here = came is not None and came.get("parent") == ckpt.vm_id and came.get("checkpoint") == ckpt.name
            if from_here and ckpt.ram_file and vm.rec.ram_mode is RamMode.TEMPLATE_COW and vm_id != ckpt.vm_id:
                found.append(f"VM {vm_id}")
        for other in list_for(settings, vm_id):
            if other.path != ckpt.path and layer in {p.resolve() for p in disks.backing_chain(other.disk)}:
                found.append(f"checkpoint {vm_id}/{other.name}")
    return found


def reads_outside(settings: VmmSettings, vm_id: str) -> str | None:
    """Another VM's checkpoint layer the VM's disk (or a checkpoint's) reads through, if any (a fork's
    child): what a move to another host would leave behind."""
    vm_dir = (settings.vms_dir / vm_id).resolve()
    for image in (vm_dir / OVERLAY, *(c.disk for c in list_for(settings, vm_id))):
        for layer in disks.backing_chain(image):
            if layer.suffix == ".qcow2" and vm_dir not in layer.resolve().parents:
                return str(layer)
    return None


def disk_usage(settings: VmmSettings, vm_id: str) -> dict[str, object]:
    """Bytes on the host: the VM's own files and each checkpoint's (what `mvm vm get` shows)."""
    vm_dir = settings.vms_dir / vm_id
    own = sum(disks.allocated_bytes(p) for p in vm_dir.iterdir() if p.is_file()) if vm_dir.is_dir() else 0
    per = {c.name: c.size_bytes() for c in list_for(settings, vm_id)}
    return {"vm_bytes": own, "checkpoints": per, "total_bytes": own + sum(per.values()),
            "chain_depth": len(disks.backing_chain(vm_dir / OVERLAY))}  # fmt: skip


class Checkpoints:
    """Capture and rewind of one VM at a time (its lock held), over the runtime and the snapshots."""

    def __init__(
        self, settings: VmmSettings, runtime: Runtime, lifecycle: Lifecycle, records: RecordStore, snapshots: Snapshots
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.lifecycle = lifecycle
        self.records = records
        self.snapshots = snapshots
        self.forking: dict[tuple[str, str], int] = {}  # (vm, checkpoint) -> forks from it under way
        self.giving_ram: dict[tuple[str, str], asyncio.Lock] = {}  # one RAM-file conversion per checkpoint

    def _vm_dir(self, vm: LiveVm) -> Path:
        return self.settings.vms_dir / vm.rec.id

    # ---- capture ---------------------------------------------------------------------------

    async def capture(self, vm: LiveVm, name: str) -> Checkpoint:
        """Checkpoint `name` of the VM now: a running VM is paused for the capture only, a suspended one
        is copied from its snapshot. On failure nothing of it is left and the VM is as it was."""
        vm_id = vm.rec.id
        check_name(name)
        existing = list_for(self.settings, vm_id)
        if any(c.name == name for c in existing):
            raise Conflict(f"VM {vm_id} has a checkpoint named {name!r} already")
        if len(existing) >= self.settings.max_checkpoints:
            raise Conflict(f"VM {vm_id} has {len(existing)} checkpoints, the most vmm.max_checkpoints allows: "
                           "delete one first")  # fmt: skip
        if vm.rec.state not in (VmState.RUNNING, VmState.PAUSED, VmState.SUSPENDED):
            raise Conflict(f"VM {vm_id} is {vm.rec.state.value}: only a running, paused or suspended VM has a "
                           "moment to checkpoint")  # fmt: skip
        if vm.moving:
            raise Conflict(f"VM {vm_id} is moving to another host")
        final = root(self.settings, vm_id) / name
        tmp = final.with_name(f".{name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            phases = Phases()
            if vm.rec.state is VmState.SUSPENDED:
                paused_ms = await self._copy_suspended(vm, tmp)
            else:
                paused_ms = await self._capture_live(vm, tmp, phases)
            key = self._vm_dir(vm) / AGENT_KEY
            if key.exists():
                copy_key(key, tmp / AGENT_KEY)
            faults.point("checkpoint.written")
            size = sum(disks.allocated_bytes(p) for p in tmp.iterdir())
            if size > self.settings.checkpoint_max_mb << 20:
                raise OverCapacity(f"checkpoint {name!r} of VM {vm_id} takes {size >> 20} MiB, more than "
                                   f"vmm.checkpoint_max_mb={self.settings.checkpoint_max_mb}; nothing was kept")
            meta = {"name": name, "vm": vm_id, "created_at": time.time(), "paused_ms": paused_ms}
            (tmp / META).write_bytes(orjson.dumps(meta))
            (tmp / disks.CHILDREN).touch()  # none yet: each fork adds its child before the child's QEMU starts
            jail.seal_template(tmp)  # root's and read-only: children map its RAM and read through its disk
            tmp.rename(final)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, Exception) and not isinstance(exc, VmmError):
                raise VmmError(f"checkpoint {name!r} of VM {vm_id} failed, nothing of it was kept and the VM is "
                               f"{vm.rec.state.value}: {exc}") from exc
            raise
        ckpt = load(self.settings, vm_id, name)
        log.event("vm.checkpointed", vm=vm_id, checkpoint=name, paused_ms=paused_ms, bytes=ckpt.size_bytes(),
                  phases=phases.to_dict())  # fmt: skip
        return ckpt

    async def _capture_live(self, vm: LiveVm, into: Path, phases: Phases) -> float:
        """Stop the vCPUs, save the device state (RAM too unless the VM has a RAM file, which is copied),
        copy the disk (QEMU flushed it at `stop`), run on. The VM is recorded paused meanwhile."""
        was = vm.rec.state
        vm_dir = self._vm_dir(vm)
        own_file = vm.rec.ram_mode is RamMode.OWN_FILE
        if vm.qmp is not None:
            await qmp_ops.end_block_jobs(vm.qmp, self.settings.restore_timeout)
        started = time.monotonic()
        phases.mark("end_block_jobs")
        if was is VmState.RUNNING:
            await self.runtime.command(vm, "stop")
            try:
                self.lifecycle.move_if_stored(vm.rec, VmState.PAUSED, reason="checkpoint")
            except BaseException:
                await self.runtime.command(vm, "cont")
                raise
        phases.mark("stop")
        try:
            await self.runtime.save(vm, into / STATE, own_file)
            if vm.qmp is not None:
                await qmp_ops.finalized(vm.qmp, self.settings.restore_timeout)
            phases.mark("device_state")
            faults.point("checkpoint.saved")
            copies = [disks.copy_layer(vm_dir / OVERLAY, into / OVERLAY)] if (vm_dir / OVERLAY).exists() else []
            if own_file:
                copies.append(disks.copy_extents(vm_dir / RAM, into / RAM))
            await asyncio.gather(*copies)
            phases.mark("disk_and_ram")
        finally:
            if was is VmState.RUNNING:
                # `cont` after a completed save: QEMU takes its disk back and the guest runs on
                self.lifecycle.record_outcome(vm.rec, VmState.RUNNING)
                await self.runtime.command(vm, "cont")
                phases.mark("cont")
        return round((time.monotonic() - started) * 1000, 1)

    async def _copy_suspended(self, vm: LiveVm, into: Path) -> float:
        """A suspended VM's snapshot as a checkpoint: its device state hard-linked (replaced, never written
        in place), its RAM file and disk copied (a wake writes both in place)."""
        vm_dir = self._vm_dir(vm)
        _link_state(vm_dir, into)
        copies = [disks.copy_layer(vm_dir / OVERLAY, into / OVERLAY)] if (vm_dir / OVERLAY).exists() else []
        own_file = vm.rec.ram_mode is RamMode.OWN_FILE
        if own_file:
            copies.append(disks.copy_extents(vm_dir / RAM, into / RAM))
        await asyncio.gather(*copies)
        return 0.0  # it was not paused: it had no QEMU

    async def delete(self, vm: LiveVm, name: str, vms: Iterable[LiveVm]) -> None:
        ckpt = load(self.settings, vm.rec.id, name)
        if self.forking.get((vm.rec.id, name)):
            raise Conflict(f"checkpoint {name!r} of VM {vm.rec.id} is being forked from")
        users = dependants(self.settings, vms, ckpt)
        if users:
            raise Conflict(f"checkpoint {name!r} of VM {vm.rec.id} is in use by {', '.join(users)}: delete or "
                           "flatten them first")  # fmt: skip
        trash = ckpt.path.with_name(f".{name}.removing.tmp")
        ckpt.path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        log.event("vm.checkpoint_deleted", vm=vm.rec.id, checkpoint=name)

    # ---- rewind ----------------------------------------------------------------------------

    async def rewind(self, vm: LiveVm, name: str) -> None:
        """The same VM back at checkpoint `name`: suspended first (so a failure can put it back as it was),
        its files replaced by the checkpoint's (a new disk overlay over the checkpoint's layer), restored."""
        vm_id, vm_dir = vm.rec.id, self._vm_dir(vm)
        ckpt = load(self.settings, vm_id, name)
        if self.forking.get((vm_id, name)):
            raise Conflict(f"checkpoint {name!r} of VM {vm_id} is being forked from: rewind after the fork")
        if vm.rec.state in (VmState.RUNNING, VmState.PAUSED):
            await self.snapshots.suspend(vm)
        self.lifecycle.refuse_unless(vm.rec, VmState.SUSPENDED)
        if vm.moving:
            raise Conflict(f"VM {vm_id} is moving to another host")
        aside = vm_dir / _UNDO
        shutil.rmtree(aside, ignore_errors=True)
        aside.mkdir()
        was_mode = vm.rec.ram_mode
        _move_files(vm_dir, aside)
        (aside / _ASIDE_DONE).touch()  # from here a file of the VM's not in `aside` is the checkpoint's
        try:
            _link_state(ckpt.path, vm_dir)
            if ckpt.ram_file:
                await disks.copy_extents(ckpt.path / RAM, vm_dir / RAM)
                os.chmod(vm_dir / RAM, 0o600)
            if ckpt.disk.exists():
                await disks.create_layer(ckpt.disk, vm_dir / OVERLAY)
            vm.rec.ram_mode = RamMode.OWN_FILE if ckpt.ram_file else RamMode.TEMPLATE_COW
            self.records.write(vm.rec)
            faults.point("rewind.placed")
            await self.snapshots.restore(vm)
        except BaseException:
            if vm.rec.state is VmState.SUSPENDED:  # never ran from the checkpoint: back as it was
                _put_back(aside, vm_dir)
                vm.rec.ram_mode = was_mode
                self.records.write(vm.rec)
            raise
        finally:
            shutil.rmtree(aside, ignore_errors=True)
        log.event("vm.rewound", vm=vm_id, checkpoint=name)
        await self.flatten_if_deep(vm)

    async def flatten_if_deep(self, vm: LiveVm) -> None:
        """Past vmm.max_chain_depth layers: a QMP block-stream job copies the checkpoint layers into the VM's
        own overlay while it serves; QEMU rewrites the overlay's backing to the template's base at its end."""
        chain = disks.backing_chain(self._vm_dir(vm) / OVERLAY)
        if len(chain) <= self.settings.max_chain_depth or vm.qmp is None:
            return
        nodes: list[dict[str, object]] = await vm.qmp.execute("query-named-block-nodes", {"flat": True})  # type: ignore[assignment]
        base = chain[-1].resolve()
        names = [str(n["node-name"]) for n in nodes
                 if n.get("drv") == "raw" and Path(str(n.get("file", ""))).resolve() == base]  # fmt: skip
        if not names:
            log.event("vm.flatten_skipped", level="warning", vm=vm.rec.id, why="no block node for the base disk")
            return
        await vm.qmp.execute("block-stream", {"job-id": f"flatten-{vm.rec.id}", "device": "disk0",
                                              "base-node": names[-1]})  # fmt: skip
        log.event("vm.flattening", vm=vm.rec.id, layers=len(chain))


def finish_interrupted_rewind(vm_dir: Path, suspended: bool) -> RamMode | None:
    """After a restart: a rewind the manager did not finish. A VM that is suspended (its restore never
    ran the guest) gets its files from before the rewind back, and the RAM mode they go with; one whose
    guest runs keeps the checkpoint's, and the set-aside files go."""
    aside = vm_dir / _UNDO
    if not aside.is_dir():
        return None
    mode = None
    if suspended:
        _put_back(aside, vm_dir)
        mode = RamMode.OWN_FILE if (vm_dir / RAM).exists() else RamMode.TEMPLATE_COW
    shutil.rmtree(aside, ignore_errors=True)
    return mode


def _put_back(aside: Path, vm_dir: Path) -> None:
    """The files set aside back in place. Once every one was set aside (the marker), a file of the VM's
    that is not among them is the checkpoint's and goes; before that, what is left is the VM's own."""
    complete = (aside / _ASIDE_DONE).exists()
    for name in _REPLACED:
        if (aside / name).exists():
            (aside / name).rename(vm_dir / name)
        elif complete:
            (vm_dir / name).unlink(missing_ok=True)


def _link_state(src_dir: Path, dst_dir: Path) -> None:
    """A snapshot's device state and its checksum, hard-linked (both are replaced, never written in place)."""
    for path in (src_dir / STATE, snapshot_check.sidecar(src_dir / STATE)):
        if path.exists():
            os.link(path, dst_dir / path.name)


_REPLACED = (STATE, snapshot_check.sidecar(Path(STATE)).name, RAM, OVERLAY)  # the files a rewind replaces


def _move_files(src_dir: Path, dst_dir: Path) -> None:
    for name in _REPLACED:
        if (src_dir / name).exists():
            (src_dir / name).rename(dst_dir / name)
