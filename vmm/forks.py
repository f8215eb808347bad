"""Forks: new VMs that continue from a checkpoint of another (vmm.checkpoints).

Each child is a VM of its own (id, URL, namespace, policy, disk overlay over the checkpoint's
layer). Its RAM maps the checkpoint's RAM file copy-on-write, as a clone maps its template's;
a checkpoint whose RAM is in its device-state stream is loaded into a RAM file of the child's
own. Before its first request the guest agent syncs it (clock, fresh entropy, its id as
hostname, a new agent key): children never share RNG output with each other or with their
parent, and a child takes no frame with its parent's key. Its `run` hook is not called again;
the `fork` hook tells it whose child it is.
"""

from __future__ import annotations

import asyncio
import time

import orjson

from . import disks, faults
from .agent import copy_key
from .checkpoints import ORIGIN, Checkpoint
from .errors import VmFailed
from .hook_runner import run_hook
from .jsonlog import log
from .live import LiveVm
from .model import RamMode, Template
from .own_key import take_own_key
from .phases import Phases
from .qemu import RamBacking
from .transitions import Transitions
from .vm_files import AGENT_KEY, OVERLAY, RAM, STATE

MAX_COUNT = 32


async def launch_child(transitions: Transitions, vm: LiveVm, tpl: Template, ckpt: Checkpoint, index: int) -> None:
    """Start pending child `vm` from `ckpt`; on failure everything it acquired is released and it is
    terminated with the reason."""
    settings = transitions.settings
    vm_id = vm.rec.id
    vm_dir = settings.vms_dir / vm_id
    started = time.monotonic()
    phases = Phases()
    network = asyncio.ensure_future(_open_network(transitions, vm, tpl))  # made while its files are
    try:
        vm_dir.mkdir(parents=True)
        (vm_dir / ORIGIN).write_bytes(orjson.dumps({"parent": ckpt.vm_id, "checkpoint": ckpt.name, "index": index}))
        if (ckpt.path / AGENT_KEY).exists():  # the key the guest wakes with: its first sync replaces it
            copy_key(ckpt.path / AGENT_KEY, vm_dir / AGENT_KEY)
        if ckpt.disk.exists():
            disks.admit_child(ckpt.path, vm_id)
            await disks.create_layer(ckpt.disk, vm_dir / OVERLAY)
        phases.mark("files")
        await network
        phases.mark("network")
        # the checkpoint's RAM file mapped copy-on-write, or a RAM file of the child's own for a stream to fill
        ram = RamBacking(ckpt.path / RAM, share=False) if ckpt.ram_file else RamBacking(vm_dir / RAM, share=True)
        faults.point("fork.prepared")
        await transitions.snapshots.start_from(vm, tpl, ram, ckpt.path / STATE, ckpt.ram_file, "fork", phases)
        sync_timeout = settings.restore_timeout if settings.guest_sync else 0.0
        await take_own_key(vm, vm_dir / AGENT_KEY, sync_timeout, "its parent")
        phases.mark("own key")
        if not ckpt.ram_file:
            vm.rec.ram_mode = RamMode.OWN_FILE  # the stream was loaded into the child's own RAM file
            transitions.records.write(vm.rec)
    except BaseException as exc:
        await asyncio.gather(network, return_exceptions=True)  # done before what it made is released
        why = f"its fork from checkpoint {ckpt.vm_id}/{ckpt.name} failed: {exc}"
        await transitions.discard(vm, why)
        if isinstance(exc, Exception):
            where = f"VM {ckpt.vm_id}'s checkpoint {ckpt.name!r}"
            raise VmFailed(f"could not fork child {index} from {where}, nothing of it is left: {exc}") from exc
        raise
    body = orjson.dumps({"parent": ckpt.vm_id, "checkpoint": ckpt.name, "index": index})
    env = (f"MVM_PARENT={ckpt.vm_id}", f"MVM_CHECKPOINT={ckpt.name}", f"MVM_FORK_INDEX={index}")
    await run_hook(vm, tpl, "fork", body, env)
    phases.mark("hook")
    log.event("vm.forked", vm=vm_id, parent=ckpt.vm_id, checkpoint=ckpt.name, index=index,
              ms=round((time.monotonic() - started) * 1000, 1), phases=phases.to_dict())  # fmt: skip


async def _open_network(transitions: Transitions, vm: LiveVm, tpl: Template) -> None:
    await transitions.runtime.provision(vm, tpl)
    await transitions.runtime.open_egress(vm)
