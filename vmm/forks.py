"""Forks: new VMs that continue from a checkpoint of another (vmm.checkpoints).

Each child is a VM of its own (id, URL, namespace, policy, disk overlay over the checkpoint's
layer). Its RAM maps the checkpoint's RAM file copy-on-write, as a clone maps its template's;
a checkpoint whose RAM is in its device-state stream is loaded into a RAM file of the child's
own. Before its first request the guest agent syncs it (clock, fresh entropy, its id as
hostname): children never share RNG output with each other or with their parent. Its `run`
hook is not called again; the `fork` hook tells it whose child it is. The guest keeps the
agent key it had at the checkpoint (it learnt it once; a new key would need a guest change).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time

import orjson

from . import disks, faults
from .agent import AgentError
from .checkpoints import ORIGIN, Checkpoint
from .errors import VmFailed
from .hook_runner import run_hook
from .jsonlog import log
from .live import LiveVm
from .model import RamMode, Template
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
    network = asyncio.ensure_future(_open_network(transitions, vm))  # made while its files are
    try:
        vm_dir.mkdir(parents=True)
        (vm_dir / ORIGIN).write_bytes(orjson.dumps({"parent": ckpt.vm_id, "checkpoint": ckpt.name, "index": index}))
        if (ckpt.path / AGENT_KEY).exists():
            shutil.copyfile(ckpt.path / AGENT_KEY, vm_dir / AGENT_KEY)
            os.chmod(vm_dir / AGENT_KEY, 0o600)
        if ckpt.disk.exists():
            await disks.create_layer(ckpt.disk, vm_dir / OVERLAY)
        phases.mark("files")
        await network
        phases.mark("network")
        # the checkpoint's RAM file mapped copy-on-write, or a RAM file of the child's own for a stream to fill
        ram = RamBacking(ckpt.path / RAM, share=False) if ckpt.ram_file else RamBacking(vm_dir / RAM, share=True)
        faults.point("fork.prepared")
        synced = await transitions.snapshots.start_from(vm, tpl, ram, ckpt.path / STATE, ckpt.ram_file, "fork",
                                                         phases)  # fmt: skip
        if not synced:
            await _synced(vm, settings.restore_timeout if settings.guest_sync else 0.0)
            phases.mark("resync")
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


async def _open_network(transitions: Transitions, vm: LiveVm) -> None:
    await transitions.runtime.create_network(vm.rec.id)
    await transitions.runtime.open_egress(vm)


async def _synced(vm: LiveVm, timeout: float) -> None:
    """A child must not answer with its parent's RNG state: the launch's sync, which a busy host may let
    time out and skip, is made once more with the restore's timeout, and a child it fails for is ended."""
    if vm.agent is None or not timeout:
        return
    try:
        await vm.agent.sync(vm.rec.id, timeout)
    except AgentError as exc:
        raise VmFailed(f"its guest agent took no fresh entropy (it would share its parent's): {exc}") from exc
