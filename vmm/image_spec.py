"""The busybox demo guest's spec (image.toml) and its reproducible initramfs builder.

An image.toml names a Debian kernel package and its modules, a busybox /init script and
a static C app; the build is a `vmlinuz` plus an `initrd.img` holding the whole guest.
The build is reproducible: the same spec, kernel package and toolchain give a
byte-identical initrd.img (sorted entries, fixed mtimes and owners, `cpio --reproducible`,
`gzip -n`, no build paths in the app binary).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import initramfs, kernel
from .buildtools import (
    Progress,
    Steps,
    compile_static,
    find_static_busybox,
    install_dir,
    locked,
    package_version,
    run,
    sha256_file,
    source_date_epoch,
    tool,
)
from .errors import InvalidRequest, NotFound
from .image import FORMAT_VERSION, IMAGE_JSON, INITRD_FILE, KERNEL_FILE, NAME_RE, Image, load_image, write_metadata

MAX_PORTS = 16  # the demo app's limit; also keeps the kernel command line short
MAX_CMDLINE = 2048  # x86 COMMAND_LINE_SIZE

_DEB_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_MODULE_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_PROBE_PATH_RE = re.compile(r"^/[\x21-\x7e]*$")


@dataclass(frozen=True)
class ImageSpec:
    """A validated image.toml. Paths are absolute (resolved against the spec's directory)."""

    name: str
    path: Path  # the spec file itself
    kernel_package: str  # usually a metapackage such as linux-image-cloud-amd64
    modules: tuple[str, ...]  # wanted in the initramfs; dependencies are added at build
    cmdline: str  # base kernel command line, without mvm.* parameters
    init: Path
    app_source: Path
    app_port: int
    extra_ports: tuple[int, ...]
    probe_method: str
    probe_path: str
    probe_status: int
    memory_mb: int
    vcpus: int

    @property
    def ports(self) -> tuple[int, ...]:
        """Every port the app listens on, app_port first."""
        return (self.app_port, *self.extra_ports)

    @property
    def image_cmdline(self) -> str:
        """The base command line plus the ports for /init; the VMM appends network and accel params."""
        return f"{self.cmdline} mvm.ports={','.join(map(str, self.ports))}"


# ---------------------------------------------------------------- spec


_SPEC_KEYS: dict[str, tuple[str, ...]] = {
    "kernel": ("package", "modules", "cmdline"),
    "initramfs": ("init",),
    "app": ("source", "port", "extra_ports"),
    "probe": ("method", "path", "expect_status"),
    "vm": ("memory_mb", "vcpus"),
}
_MISSING: Any = object()


class _Reader:
    """Typed access to one TOML table; every error names the full key (e.g. app.port)."""

    def __init__(self, where: str, data: dict[str, Any], prefix: str, known: tuple[str, ...]) -> None:
        self.where, self.data, self.prefix = where, data, prefix
        unknown = sorted(set(data) - set(known))
        if unknown:
            self.fail(unknown[0], f"unknown key (known: {', '.join(known)})")

    def fail(self, key: str, why: str) -> None:
        raise InvalidRequest(f"{self.where}: {self.prefix}{key}: {why}")

    def get(self, key: str, default: Any) -> Any:
        if key not in self.data:
            if default is _MISSING:
                self.fail(key, "required key is missing")
            return default
        return self.data[key]

    def text(self, key: str, default: Any = _MISSING, pattern: re.Pattern[str] | None = None) -> str:
        value = self.get(key, default)
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string, got {value!r}")
        if pattern is not None and not pattern.match(value):
            self.fail(key, f"invalid value {value!r} (must match {pattern.pattern})")
        return value

    def integer(self, key: str, low: int, high: int, default: Any = _MISSING) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(key, f"must be an integer in [{low}, {high}], got {value!r}")
        return int(value)

    def items(self, key: str, default: Any = _MISSING) -> list[Any]:
        value = self.get(key, default)
        if not isinstance(value, list):
            self.fail(key, f"must be a list, got {value!r}")
        return list(value)

    def file(self, key: str, base: Path) -> Path:
        path = (base / self.text(key)).resolve()
        if not path.is_file():
            self.fail(key, f"file not found: {path}")
        return path


def load_spec(path: Path) -> ImageSpec:
    """Read and validate an image.toml; raises InvalidRequest naming the offending key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFound(f"image spec not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest(f"{path}: not valid TOML: {exc}") from None

    where = str(path)
    top = _Reader(where, raw, "", ("name", *_SPEC_KEYS))
    tables: dict[str, _Reader] = {}
    for section, keys in _SPEC_KEYS.items():
        table = top.get(section, {} if section == "vm" else _MISSING)
        if not isinstance(table, dict):
            top.fail(section, f"must be a table ([{section}]), got {table!r}")
        tables[section] = _Reader(where, table, f"{section}.", keys)
    kernel, initramfs, app, probe, vm = (tables[s] for s in _SPEC_KEYS)
    base = path.resolve().parent

    name = top.text("name", pattern=NAME_RE)

    modules = kernel.items("modules")
    if not modules:
        kernel.fail("modules", "must name at least one module (virtio_mmio and virtio_net for microvm)")
    for module in modules:
        if not isinstance(module, str) or not _MODULE_RE.match(module):
            kernel.fail("modules", f"invalid module name {module!r}")
    if len(set(modules)) != len(modules):
        kernel.fail("modules", "lists a module twice")

    cmdline = kernel.text("cmdline")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in cmdline):
        kernel.fail("cmdline", "must be one line of printable characters")
    if len(cmdline) > MAX_CMDLINE // 2:
        kernel.fail("cmdline", f"longer than {MAX_CMDLINE // 2} characters (the VMM appends more)")
    for arg in cmdline.split():
        if arg.startswith("mvm.") or arg.startswith("initrd="):
            kernel.fail("cmdline", f"must not set {arg.split('=')[0]} (the builder and VMM set it)")

    app_port = app.integer("port", 1, 65535)
    extra = app.items("extra_ports", [])
    for port in extra:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            app.fail("extra_ports", f"must be a list of TCP ports in [1, 65535], got {port!r}")
    if len({app_port, *extra}) != len(extra) + 1:
        app.fail("extra_ports", "must not repeat a port or app.port")
    if len(extra) + 1 > MAX_PORTS:
        app.fail("extra_ports", f"at most {MAX_PORTS} ports in total")

    method = probe.text("method", "GET").upper()
    if method not in ("GET", "HEAD"):
        probe.fail("method", f"must be GET or HEAD, got {method!r}")

    return ImageSpec(
        name=name,
        path=path.resolve(),
        kernel_package=kernel.text("package", pattern=_DEB_RE),
        modules=tuple(modules),
        cmdline=" ".join(cmdline.split()),
        init=initramfs.file("init", base),
        app_source=app.file("source", base),
        app_port=app_port,
        extra_ports=tuple(extra),
        probe_method=method,
        probe_path=probe.text("path", pattern=_PROBE_PATH_RE),
        probe_status=probe.integer("expect_status", 100, 599, 200),
        memory_mb=vm.integer("memory_mb", 64, 65536, 256),
        vcpus=vm.integer("vcpus", 1, 64, 1),
    )


# ---------------------------------------------------------------- builder


def build_spec_image(spec_path: Path, images_dir: Path, cache_dir: Path, progress: Progress) -> Image:
    """Build the image described by `spec_path` into `images_dir/<name>/` and return it.

    The kernel .deb and its extracted tree are kept in `cache_dir` and reused. The result
    is installed by renaming a finished directory into place, so readers never see a
    half-written image; concurrent builds of the same image are serialised by a lock.
    """
    started = time.monotonic()
    spec = load_spec(Path(spec_path))
    images_dir, cache_dir = Path(images_dir).resolve(), Path(cache_dir).resolve()
    images_dir.mkdir(parents=True, exist_ok=True)
    epoch = source_date_epoch()
    step = Steps(progress, 7)
    tree = kernel.prepare(spec.kernel_package, cache_dir, step)

    step(f"resolving modules {', '.join(spec.modules)}")
    modules = kernel.resolve_modules(tree, spec.modules)
    progress(f"      {len(modules)} modules: {' '.join(m.name for m in modules)}")

    with (
        locked(images_dir / f".{spec.name}.lock"),
        tempfile.TemporaryDirectory(prefix=f".{spec.name}.build-", dir=images_dir) as tmp_name,
    ):
        tmp = Path(tmp_name)
        step(f"compiling {spec.name} app ({spec.app_source.name})")
        app = compile_static(spec.app_source, tmp / "cc", epoch)

        busybox = find_static_busybox()
        step(f"staging initramfs (busybox, init, app, {len(modules)} modules)")
        stage = tmp / "stage"
        order = initramfs.stage(stage, busybox=busybox, init=spec.init, modules=modules, binaries={"bin/app": app})

        out = tmp / spec.name
        out.mkdir()
        step(f"writing {INITRD_FILE} and {IMAGE_JSON}")
        initramfs.write(stage, out / INITRD_FILE, epoch, tmp / "initrd.cpio", {"bin/app"})
        shutil.copyfile(tree.vmlinuz, out / KERNEL_FILE)
        for name in (KERNEL_FILE, INITRD_FILE):
            os.chmod(out / name, 0o644)
        write_metadata(out, _metadata(spec, tree, order, out, epoch, busybox))
        install_dir(out, images_dir / spec.name, tmp / "previous")

    image = load_image(images_dir, spec.name)
    size = image.initrd.stat().st_size
    progress(
        f"built image {spec.name} in {time.monotonic() - started:.1f} s: {images_dir / spec.name} "
        f"(initrd {size / 1e6:.2f} MB sha256 {image.initrd_sha256[:12]}, "
        f"kernel {tree.deb.package} {tree.deb.version})"
    )
    return image


def _metadata(
    spec: ImageSpec, tree: kernel.KernelTree, modules: list[str], out: Path, epoch: int, busybox: Path
) -> dict[str, Any]:
    deb = tree.deb
    files = {
        name: {"sha256": sha256_file(out / name), "size": (out / name).stat().st_size}
        for name in (KERNEL_FILE, INITRD_FILE)
    }
    gcc_version = run([tool("gcc"), "-dumpfullversion"], "gcc -dumpfullversion", timeout=30).strip()
    return {
        "format": FORMAT_VERSION,
        "name": spec.name,
        "spec": str(spec.path),
        "cmdline": spec.image_cmdline,
        "base_cmdline": spec.cmdline,
        "app_port": spec.app_port,
        "ports": list(spec.ports),
        "kind": "initramfs",
        "probe": {"kind": "http", "port": spec.app_port, "method": spec.probe_method, "path": spec.probe_path,
                  "expect_status": spec.probe_status},
        "memory_mb": spec.memory_mb,
        "vcpus": spec.vcpus,
        "kernel": {
            "metapackage": spec.kernel_package,
            "package": deb.package,
            "version": deb.version,
            "release": tree.release,
            "deb_sha256": deb.sha256,
        },
        "modules": modules,
        "files": files,
        "build": {
            "source_date_epoch": epoch,
            "gcc": gcc_version,
            "busybox": f"{busybox} {package_version('busybox-static')}",
            "app_source_sha256": sha256_file(spec.app_source),
            "init_sha256": sha256_file(spec.init),
        },
    }
