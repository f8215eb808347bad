"""Templates: boot an image once, wait for its app, snapshot it. Every VM starts from one.

A template directory holds its own copy of the kernel and initrd, the frozen guest RAM
file (never written again: clones map it copy-on-write), the device-state stream and,
for a disk image, the root disk as it was at the snapshot (`disk.base`, read-only: each VM
writes to its own qcow2 overlay backed by it).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from . import capacity, disks, jail, probe
from . import qmp as qmp_ops
from .accel import LEGACY_CPU, Accelerator
from .errors import Conflict, InvalidRequest, NotFound, VmmError
from .hooks import Hooks, call_http
from .image import load_image
from .model import Template
from .network import netns
from .qemu import (
    AGENT_SOCKET,
    APP_LOG,
    QMP_SOCKET,
    SERIAL_LOG,
    DiskBacking,
    MachineSpec,
    QemuProcess,
    RamBacking,
)
from .settings import VmmSettings

NAME_RE = re.compile(r"[a-z][a-z0-9]{0,30}")
SNAPSHOT_TIMEOUT = 60.0
BASE_DISK = "disk.base"


def template_ns(name: str) -> str:
    """Namespace id used while a template boots (removed once it is snapshotted). Unique per boot:
    managers on other state directories may be making a template of the same name right now."""
    return f"tpl-{name}-{secrets.token_hex(3)}"


def check_name(name: object) -> str:
    """The one check of a template name, in every mode (it also keeps a name inside templates_dir)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidRequest(f"template name {name!r} must match {NAME_RE.pattern}")
    return name


def load(settings: VmmSettings, name: str) -> Template:
    check_name(name)
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
        disk_mb=data.get("disk_mb", 0),
        hooks=Hooks.from_dict(data["hooks"]) if data.get("hooks") else None,
        h2c_ports=tuple(data.get("h2c_ports", ())),
        cpu=data.get("cpu") or LEGACY_CPU.get(data["accelerator"], ""),
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
        accel=accel.on_cpu(tpl.cpu) if tpl.cpu else accel,
        has_disk=tpl.base_disk is not None,
    )


async def create(
    settings: VmmSettings, name: str, image_name: str, accel: Accelerator, progress: Callable[[str], None]
) -> Template:
    """Boot `image_name`, wait until its app is ready, snapshot memory, devices and disk as template `name`.

    The disk is captured at the same instant as memory: `stop` flushes QEMU's block layer,
    the device state is saved, QEMU ends, and the disk becomes the read-only base every
    VM's overlay is backed by.
    """
    if not NAME_RE.fullmatch(name):
        raise InvalidRequest(f"template name {name!r} must match {NAME_RE.pattern}")
    final = settings.templates_dir / name
    if final.exists():
        raise Conflict(f"template {name!r} already exists")
    image = load_image(settings.images_dir, image_name)
    capacity.check_fits(image.memory_mb, image.vcpus, settings.templates_dir)
    work = settings.templates_dir / f".{name}.building"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    disk: DiskBacking | None = None
    try:
        shutil.copyfile(image.kernel, work / "vmlinuz")
        shutil.copyfile(image.initrd, work / "initrd.img")
        if image.disk is not None:
            progress(f"copying the {image.disk_mb} MiB root disk (sparse)")
            await disks.sparse_copy(image.disk, work / BASE_DISK)
            disk = DiskBacking(work / BASE_DISK, "raw")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    ns_id = template_ns(name)
    spec = MachineSpec(
        name=f"mvm-{ns_id}",
        kernel=work / "vmlinuz",
        initrd=work / "initrd.img",
        cmdline=image.cmdline,
        memory_mb=image.memory_mb,
        vcpus=image.vcpus,
        accel=accel,
        has_disk=disk is not None,
    )
    started = time.monotonic()
    proc: QemuProcess | None = None
    jailer = jail.Jailer(settings)
    try:
        jailer.start(state_dir_check=False, join_host=False)
        await netns.create(ns_id)
        progress(f"booting image {image_name!r} under {accel.name}")
        limits = jailer.limits(image.vcpus, image.memory_mb)
        ram = RamBacking(work / "ram", share=True)
        proc = await jailer.spawn(ns_id, ns_id, spec, ram, disk, work, (), limits, incoming=False, console_socket=False)
        running = proc
        client = await qmp_ops.connect(work / QMP_SOCKET, spec.name, 10.0, lambda: running.alive)
        try:
            await probe.wait_ready(ns_id, image.ready, settings.boot_timeout, lambda: running.alive)
            if image.hooks:
                deadline = started + settings.boot_timeout
                await _pass_gates(ns_id, Hooks.from_dict(image.hooks), deadline, progress)
        except VmmError as exc:
            await client.disconnect_quietly()
            raise VmmError(f"template {name!r}: {exc}{guest_log_tail(work)}") from exc
        progress(f"app ready after {time.monotonic() - started:.2f} s; snapshotting memory, devices and disk")
        await client.execute("stop")
        try:
            size = await qmp_ops.save(client, work / "state", True, SNAPSHOT_TIMEOUT, running.exited)
        finally:
            await client.disconnect_quietly()
    except BaseException:
        if proc is not None:
            await proc.kill()  # before its files go
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if proc is not None:
            await proc.kill()  # a no-op when the except above did it
        await netns.delete(ns_id)
        await jailer.release(ns_id, work)
    for socket_file in (QMP_SOCKET, AGENT_SOCKET):
        (work / socket_file).unlink(missing_ok=True)
    jail.seal_template(work)  # root's and read-only: the base of every VM's overlay is never written again
    meta = {
        "name": name,
        "image": image_name,
        "memory_mb": image.memory_mb,
        "vcpus": image.vcpus,
        "disk_mb": image.disk_mb if disk is not None else 0,
        "app_port": image.app_port,
        "ports": list(image.ports),
        "h2c_ports": list(image.h2c_ports),
        "cmdline": image.cmdline,
        "accelerator": accel.name,
        "cpu": accel.cpu,
        "created_at": time.time(),
        "state_bytes": size,
        "image_fingerprint": image.fingerprint,
        "hooks": image.hooks,
    }
    (work / "template.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
    work.rename(final)
    progress(f"template {name!r} ready ({size} bytes of device state)")
    return load(settings, name)


async def _pass_gates(vm_ns: str, hooks: Hooks, deadline: float, progress: Callable[[str], None]) -> None:
    """The image's `ready` hook must answer 2xx (asked until the boot deadline), then `validate` once."""
    if "ready" in hooks.http:
        last = "no answer"
        while True:
            outcome = await call_http(vm_ns, hooks, "ready", b"{}")
            if outcome.ok:
                break
            last = outcome.detail
            if time.monotonic() >= deadline:
                raise VmmError(f"the ready hook did not answer 2xx before the boot timeout ({last})")
            await asyncio.sleep(0.2)
        progress("ready hook answered")
    if "validate" in hooks.http:
        outcome = await call_http(vm_ns, hooks, "validate", b"{}")
        if not outcome.ok:
            raise VmmError(f"the validate hook failed: {outcome.detail}")
        progress("validate hook answered")


def remove(settings: VmmSettings, name: str, used_by: list[str]) -> None:
    """Delete template `name` unless VMs (`used_by`) were launched from it."""
    tpl = load(settings, name)
    if used_by:
        raise Conflict(f"template {name!r} is in use by VM(s) {', '.join(sorted(used_by))}: delete them first")
    trash = Path(tpl.path).with_name(f".{name}.removing")
    shutil.rmtree(trash, ignore_errors=True)
    Path(tpl.path).rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def guest_log_tail(run_dir: Path, lines: int = 15) -> str:
    """The last lines the guest wrote (app log, else console), to say why it did not come up."""
    for name in (APP_LOG, SERIAL_LOG):
        try:
            text = (run_dir / name).read_text(errors="replace")
        except FileNotFoundError:
            continue
        tail = [line.rstrip() for line in text.strip().splitlines()[-lines:] if line.strip()]
        if tail:
            return f"; last lines of the guest's {name}: " + " | ".join(tail)
    return ""
