"""Built guest images on disk: what one holds, reading it back, listing and removing images.

An image is a directory `images_dir/<name>/` with `image.json` (what was built from what)
and the files QEMU boots:
- kind "initramfs" (the busybox demo, from an image.toml): `vmlinuz` + `initrd.img`
  holding the whole guest;
- kind "disk" (from a Dockerfile or an OCI/docker archive): `vmlinuz`, a small stage-1
  `initrd.img` that mounts the root disk, and `rootfs.ext4`, the image's filesystem with
  the guest init at /mvm/init.
Builders write into a temporary directory and rename it into place, so a half-built image
is never listed.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import Conflict, InvalidRequest, NotFound, VmmError
from .port_protocols import h2c_ports

IMAGE_JSON = "image.json"
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
DISK_FILE = "rootfs.ext4"
FORMAT_VERSION = 1
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class Readiness:
    """How the host knows the app is up: an HTTP answer with a status, or a TCP port accepting."""

    kind: str  # http | tcp
    port: int
    path: str = "/"
    method: str = "GET"
    expect_status: int = 200

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "port": self.port, "path": self.path, "method": self.method,
                "expect_status": self.expect_status}  # fmt: skip

    def describe(self) -> str:
        if self.kind == "tcp":
            return f"TCP port {self.port} accepting"
        return f"{self.method} {self.path} on port {self.port} answering {self.expect_status}"


@dataclass(frozen=True)
class Image:
    """A built image, ready to boot: `-kernel kernel -initrd initrd [-drive disk] -append cmdline`."""

    name: str
    kernel: Path
    initrd: Path
    cmdline: str  # the VMM appends mvm.ip=/mvm.gw= and accelerator parameters
    app_port: int
    ports: tuple[int, ...]  # app_port first
    ready: Readiness
    memory_mb: int
    vcpus: int
    kind: str = "initramfs"
    disk: Path | None = None  # kind "disk": the root filesystem, raw ext4
    disk_mb: int = 0
    source: str = ""  # what it was built from, for `mvm image ls`
    kernel_package: str = ""
    kernel_version: str = ""
    kernel_sha256: str = ""
    initrd_sha256: str = ""
    hooks: dict[str, Any] | None = None  # kind "disk": see vmm.hooks
    h2c_ports: tuple[int, ...] = ()  # ports labelled mvm.port.<n>.protocol=h2c (vmm.port_protocols)
    build_id: str = ""  # kind "disk": unique per build (its rootfs is too large to hash at every load)
    created_at: float = 0.0

    @property
    def fingerprint(self) -> str:
        """Identifies the bootable content: templates made from another fingerprint are stale."""
        text = f"{self.kernel_sha256}:{self.initrd_sha256}:{self.build_id}:{self.cmdline}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "app_port": self.app_port,
            "ports": list(self.ports),
            "ready": self.ready.to_dict(),
            "memory_mb": self.memory_mb,
            "vcpus": self.vcpus,
            "disk_mb": self.disk_mb,
            "created_at": self.created_at,
        }


def check_name(name: str) -> str:
    """Image names are directory names and hostnames' friends: lower-case, digits, dashes."""
    if not NAME_RE.match(name):
        raise InvalidRequest(f"invalid image name {name!r} (must match {NAME_RE.pattern})")
    return name


def load_image(images_dir: Path, name: str) -> Image:
    """The built image `name`; NotFound (telling the user to build it) if it is not there."""
    check_name(name)
    directory = Path(images_dir).resolve() / name
    meta_path = directory / IMAGE_JSON
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFound(f"image {name!r} is not built (no {meta_path}): run `mvm image build` first") from None
    except (OSError, ValueError) as exc:
        raise VmmError(f"image {name!r} is damaged ({meta_path}: {exc}): rebuild it with `mvm image build`") from None
    try:
        if meta["format"] != FORMAT_VERSION:
            raise VmmError(
                f"image {name!r} has format {meta['format']}, expected {FORMAT_VERSION}: "
                "rebuild it with `mvm image build`"
            )
        probe = meta["probe"]
        kind = meta.get("kind", "initramfs")
        image = Image(
            name=meta["name"],
            kernel=directory / KERNEL_FILE,
            initrd=directory / INITRD_FILE,
            cmdline=meta["cmdline"],
            app_port=int(meta["app_port"]),
            ports=tuple(int(p) for p in meta["ports"]),
            ready=Readiness(
                kind=probe.get("kind", "http"),
                port=int(probe.get("port", meta["app_port"])),
                path=probe.get("path", "/"),
                method=probe.get("method", "GET"),
                expect_status=int(probe.get("expect_status", 200)),
            ),
            memory_mb=int(meta["memory_mb"]),
            vcpus=int(meta["vcpus"]),
            kind=kind,
            disk=directory / DISK_FILE if kind == "disk" else None,
            disk_mb=int(meta.get("disk_mb", 0)),
            source=str(meta.get("source", meta.get("spec", ""))),
            kernel_package=meta["kernel"]["package"],
            kernel_version=meta["kernel"]["version"],
            kernel_sha256=meta["files"][KERNEL_FILE]["sha256"],
            initrd_sha256=meta["files"][INITRD_FILE]["sha256"],
            build_id=str(meta.get("build_id", "")),
            hooks=meta.get("hooks"),
            created_at=float(meta.get("created_at", 0.0)),
            h2c_ports=h2c_ports(meta.get("labels") or {}, (int(p) for p in meta["ports"])),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise VmmError(
            f"image {name!r} is damaged ({meta_path}: bad field {exc}): rebuild it with `mvm image build`"
        ) from None
    for path in (image.kernel, image.initrd, image.disk):
        if path is not None and not path.is_file():
            raise NotFound(f"image {name!r} is incomplete ({path} missing): run `mvm image build` again")
    return image


def list_images(images_dir: Path) -> list[Image]:
    """Every complete image; a damaged one is skipped rather than hiding the others."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        return []
    images = []
    for meta in sorted(images_dir.glob(f"*/{IMAGE_JSON}")):
        try:
            images.append(load_image(images_dir, meta.parent.name))
        except VmmError:
            continue
    return images


def remove_image(images_dir: Path, name: str, used_by: list[str]) -> None:
    """Delete image `name` unless templates (`used_by`) were made from it."""
    directory = Path(images_dir) / check_name(name)
    if not (directory / IMAGE_JSON).exists():
        raise NotFound(f"image {name!r} does not exist")
    if used_by:
        raise Conflict(
            f"image {name!r} is in use by template(s) {', '.join(used_by)}: remove them first (`mvm template rm`)"
        )
    trash = directory.with_name(f".{name}.removing")
    shutil.rmtree(trash, ignore_errors=True)
    directory.rename(trash)  # gone from listings at once, even if the delete below is slow
    shutil.rmtree(trash, ignore_errors=True)


def write_metadata(directory: Path, meta: dict[str, Any]) -> None:
    (directory / IMAGE_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
