"""Templates: boot an image once, wait for its app, snapshot it. Every VM starts from one.

A template directory holds its own copy of the kernel and initrd, the frozen guest RAM
file (never written again: clones map it copy-on-write) and the device-state stream.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from . import netns, probe
from . import qmp as qmp_ops
from .accel import Accelerator
from .errors import Conflict, InvalidRequest, NotFound, VmmError
from .image import load_image
from .model import Template
from .qemu import MachineSpec, QemuProcess, RamBacking, build_argv
from .settings import VmmSettings

NAME_RE = re.compile(r"[a-z][a-z0-9]{0,30}")
SNAPSHOT_TIMEOUT = 60.0


def template_ns(name: str) -> str:
    """Namespace id used while a template boots (removed once it is snapshotted)."""
    return f"tpl-{name}"


def load(settings: VmmSettings, name: str) -> Template:
    if not NAME_RE.fullmatch(name):  # also keeps the name from reaching outside templates_dir
        raise InvalidRequest(f"template name {name!r} must match {NAME_RE.pattern}")
    meta = settings.templates_dir / name / "template.json"
    if not meta.exists():
        raise NotFound(f"template {name!r} does not exist (create it with `mvm template create {name}`)")
    data = orjson.loads(meta.read_bytes())
    return Template(
        name=data["name"],
        image=data["image"],
        memory_mb=data["memory_mb"],
        vcpus=data["vcpus"],
        app_port=data["app_port"],
        ports=tuple(data["ports"]),
        created_at=data["created_at"],
        path=str(meta.parent),
        cmdline=data["cmdline"],
        accelerator=data["accelerator"],
    )


def list_all(settings: VmmSettings) -> list[Template]:
    if not settings.templates_dir.exists():
        return []
    names = sorted(p.parent.name for p in settings.templates_dir.glob("*/template.json"))
    return [load(settings, n) for n in names]


def machine_spec(tpl: Template, name: str, accel: Accelerator) -> MachineSpec:
    """The machine every clone of `tpl` must be started with (identical to the template's boot)."""
    if tpl.accelerator != accel.name:
        raise VmmError(
            f"template {tpl.name!r} was snapshotted under {tpl.accelerator} but this host uses {accel.name}; "
            "snapshots only restore under the accelerator that made them: recreate the template"
        )
    return MachineSpec(
        name=name,
        kernel=Path(tpl.path) / "vmlinuz",
        initrd=Path(tpl.path) / "initrd.img",
        cmdline=tpl.cmdline,
        memory_mb=tpl.memory_mb,
        vcpus=tpl.vcpus,
        accel=accel,
    )


async def create(
    settings: VmmSettings, name: str, image_name: str, accel: Accelerator, progress: Callable[[str], None]
) -> Template:
    """Boot `image_name`, wait until its app answers, snapshot it as template `name`."""
    if not NAME_RE.fullmatch(name):
        raise InvalidRequest(f"template name {name!r} must match {NAME_RE.pattern}")
    final = settings.templates_dir / name
    if final.exists():
        raise Conflict(f"template {name!r} already exists")
    image = load_image(settings.images_dir, image_name)
    work = settings.templates_dir / f".{name}.building"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copyfile(image.kernel, work / "vmlinuz")
    shutil.copyfile(image.initrd, work / "initrd.img")
    spec = MachineSpec(
        name=f"mvm-{template_ns(name)}",
        kernel=work / "vmlinuz",
        initrd=work / "initrd.img",
        cmdline=image.cmdline,
        memory_mb=image.memory_mb,
        vcpus=image.vcpus,
        accel=accel,
    )
    ns_id = template_ns(name)
    started = time.monotonic()
    proc: QemuProcess | None = None
    try:
        await netns.create(ns_id)
        argv = build_argv(
            settings.qemu_binary, spec, RamBacking(work / "ram", share=True), work / "qmp.sock", work / "serial.log",
            incoming=False,
        )  # fmt: skip
        progress(f"booting image {image_name!r} under {accel.name}")
        proc = QemuProcess.spawn(argv, ns_id, work / "qemu.log")
        running = proc
        client = await qmp_ops.connect(work / "qmp.sock", spec.name, 10.0, lambda: running.alive)
        await probe.wait_ready(ns_id, image.app_port, image.probe_path, settings.boot_timeout, lambda: running.alive)
        progress(f"app ready after {time.monotonic() - started:.2f} s; snapshotting")
        await client.execute("stop")
        try:
            size = await qmp_ops.save(client, work / "state", ignore_shared=True, timeout=SNAPSHOT_TIMEOUT)
        finally:
            await client.disconnect_quietly()
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if proc is not None:
            await proc.kill()
        await netns.delete(ns_id)
    (work / "qmp.sock").unlink(missing_ok=True)
    meta = {
        "name": name,
        "image": image_name,
        "memory_mb": image.memory_mb,
        "vcpus": image.vcpus,
        "app_port": image.app_port,
        "ports": list(image.ports),
        "cmdline": image.cmdline,
        "accelerator": accel.name,
        "created_at": time.time(),
        "state_bytes": size,
    }
    (work / "template.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
    work.rename(final)
    progress(f"template {name!r} ready ({size} bytes of device state)")
    return load(settings, name)
