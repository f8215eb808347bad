"""A template from a session: a VM's checkpoint (its memory, devices and disk) becomes a template
other VMs launch from, as from one booted from an image (vmm.template).

The checkpoint's RAM file and device state are hard-linked (both are read-only and never written
again), its disk chain is flattened into the raw base every clone's overlay reads through, and the
guest agent key the guest learnt is kept with it: every clone's guest holds that key already.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import orjson

from . import jail, snapshot_check, template
from .agent import copy_key
from .checkpoints import Checkpoint
from .disks import flatten_to_raw, trusted_chain
from .errors import Conflict
from .model import Template
from .settings import VmmSettings
from .vm_files import AGENT_KEY, RAM, STATE


async def create_from(settings: VmmSettings, name: str, source: Template, ckpt: Checkpoint) -> Template:
    """Template `name` from `ckpt` (which has a RAM file of its own) of a VM of template `source`."""
    final = settings.templates_dir / template.check_name(name)
    if final.exists():
        raise Conflict(f"template {name!r} already exists")
    work = settings.templates_dir / f".{name}.building"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        for kernel in ("vmlinuz", "initrd.img"):
            shutil.copyfile(Path(source.path) / kernel, work / kernel)
        for linked in (RAM, STATE, snapshot_check.sidecar(Path(STATE)).name):
            os.link(ckpt.path / linked, work / linked)
        if (ckpt.path / AGENT_KEY).exists():  # its clones wake knowing it, and each takes its own (vmm.own_key)
            copy_key(ckpt.path / AGENT_KEY, work / AGENT_KEY)
        if ckpt.disk.exists() and source.base_disk is not None:
            trusted_chain(ckpt.disk, ckpt.vm_id, source.base_disk, settings.vms_dir)  # root's qemu-img reads all of it
            await flatten_to_raw(ckpt.disk, work / "disk.base")
        meta = orjson.loads((Path(source.path) / "template.json").read_bytes())
        meta.update(name=name, created_at=time.time(), state_bytes=(work / STATE).stat().st_size,
                    from_vm=ckpt.vm_id, from_checkpoint=ckpt.name)  # fmt: skip
        (work / "template.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
        jail.seal_template(work)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return template.load(settings, name)
