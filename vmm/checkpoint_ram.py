"""A checkpoint's RAM as a file of its own, so children map it copy-on-write (vmm.forks).

A VM that never suspended maps its template's RAM privately: its checkpoint carries its RAM in
the device-state stream. Before the first fork from such a checkpoint, a QEMU that never runs the
guest loads the stream into a shared RAM file and saves the device state again without RAM (the
RAM move of a first suspend, vmm.snapshots, done for a checkpoint). It runs jailed in a namespace
of its own, like a template's boot; the parent is not paused for it.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

from . import disks, jail
from . import qmp as qmp_ops
from .accel import Accelerator
from .checkpoints import Checkpoint, load
from .errors import VmmError
from .jsonlog import log
from .model import Template
from .network import netns
from .qemu import QEMU_LOG, QMP_SOCKET, DiskBacking, QemuProcess, RamBacking
from .settings import VmmSettings
from .template import machine_spec
from .vm_files import OVERLAY, RAM, STATE

QMP_TIMEOUT = 10.0


async def give_ram_file(settings: VmmSettings, accel: Accelerator, tpl: Template, ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` with its RAM in a file of its own (itself if it has one already)."""
    if ckpt.ram_file:
        return ckpt
    ns_id = f"ck-{secrets.token_hex(4)}"
    work = ckpt.path.with_name(f".{ns_id}.tmp")  # short: its QMP socket's path must stay under 108 bytes
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    jailer = jail.Jailer(settings)
    proc: QemuProcess | None = None
    try:
        disk = None
        if ckpt.disk.exists():
            await disks.create_layer(ckpt.disk, work / OVERLAY)  # the guest never runs: nothing is written to it
            disk = DiskBacking(work / OVERLAY, "qcow2")
        jailer.start(state_dir_check=False, join_host=False)
        await netns.create(ns_id)
        spec = machine_spec(tpl, f"mvm-{ns_id}", accel)
        limits = jailer.limits(tpl.vcpus, tpl.memory_mb)
        ram = RamBacking(work / RAM, share=True)
        chain = [] if disk is None else disks.trusted_chain(work / OVERLAY, ckpt.vm_id, tpl.base_disk, settings.vms_dir)
        # at the paths QEMU is given (the jail binds each at its real path too), each directory once
        dirs = {d.resolve(): d for d in (*(p.parent for p in chain), ckpt.path, Path(tpl.path))}
        read_only = tuple(dirs.values())
        proc = await jailer.spawn(ns_id, ns_id, spec, ram, disk, work, read_only, limits, True, False)
        running = proc
        client = await qmp_ops.connect(work / QMP_SOCKET, spec.name, QMP_TIMEOUT, lambda: running.alive)
        try:
            await qmp_ops.load(client, ckpt.path / STATE, False, settings.restore_timeout, running.exited)
            await qmp_ops.save(client, work / STATE, True, settings.restore_timeout, running.exited)
        finally:
            await client.disconnect_quietly()
        await proc.kill()
        # The RAM file first: a checkpoint with one is loaded with x-ignore-shared, which a stream that
        # still holds the RAM loads too; so a crash between these renames leaves it usable.
        for name in (RAM, f"{STATE}.sha256", STATE):
            (work / name).rename(ckpt.path / name)
        jail.seal_template(ckpt.path)
    except (VmmError, OSError) as exc:
        log_file = work / QEMU_LOG
        lines = log_file.read_text(errors="replace").strip().splitlines() if log_file.exists() else []
        why = f"{exc} (qemu: {lines[-1]})" if lines else str(exc)
        raise VmmError(f"could not give checkpoint {ckpt.vm_id}/{ckpt.name} a RAM file of its own: {why}") from exc
    finally:
        if proc is not None:
            await proc.kill()
        await netns.delete(ns_id)
        await jailer.release(ns_id, work)
        shutil.rmtree(work, ignore_errors=True)
    log.event("vm.checkpoint_ram_file", vm=ckpt.vm_id, checkpoint=ckpt.name)
    return load(settings, ckpt.vm_id, ckpt.name)
