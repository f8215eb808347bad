"""Guest images: the TOML spec, the built image on disk, and its reproducible builder.

An image is a directory `images_dir/<name>/` holding `vmlinuz` (a Debian kernel, taken
from its .deb), `initrd.img` (busybox + kernel modules + /init + the static app, as a
gzipped newc cpio) and `image.json` (what was built from what, with sha256s).

The build is reproducible: the same spec, kernel package and toolchain give a
byte-identical initrd.img (sorted entries, fixed mtimes and owners, `cpio --reproducible`,
`gzip -n`, no build paths in the app binary). Only the stdlib and a few Debian tools
are used: apt-get/apt-cache, dpkg-deb, depmod/modprobe (kmod), gcc, cpio, gzip, busybox-static.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidRequest, NotFound, VmmError

IMAGE_JSON = "image.json"
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
FORMAT_VERSION = 1
INSTALL_HINT = "run scripts/install.sh"
MAX_PORTS = 16  # the demo app's limit; also keeps the kernel command line short
MAX_CMDLINE = 2048  # x86 COMMAND_LINE_SIZE

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_DEB_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_MODULE_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_PROBE_PATH_RE = re.compile(r"^/[\x21-\x7e]*$")

Progress = Callable[[str], None]


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


@dataclass(frozen=True)
class Image:
    """A built image, ready to boot: `-kernel kernel -initrd initrd -append '<cmdline> mvm.ip=...'`."""

    name: str
    kernel: Path
    initrd: Path
    cmdline: str  # already includes mvm.ports=; append mvm.ip=/mvm.gw= and accel params
    app_port: int
    ports: tuple[int, ...]  # app_port first
    probe_path: str
    memory_mb: int
    vcpus: int
    probe_method: str = "GET"
    probe_status: int = 200
    kernel_package: str = ""
    kernel_version: str = ""
    kernel_sha256: str = ""
    initrd_sha256: str = ""

    @property
    def fingerprint(self) -> str:
        """Identifies the bootable content: templates made from another fingerprint are stale."""
        text = f"{self.kernel_sha256}:{self.initrd_sha256}:{self.cmdline}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


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

    name = top.text("name", pattern=_NAME_RE)

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


# ---------------------------------------------------------------- built images


def load_image(images_dir: Path, name: str) -> Image:
    """The built image `name`; NotFound (telling the user to build it) if it is not there."""
    if not _NAME_RE.match(name):
        raise InvalidRequest(f"invalid image name {name!r} (must match {_NAME_RE.pattern})")
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
        image = Image(
            name=meta["name"],
            kernel=directory / KERNEL_FILE,
            initrd=directory / INITRD_FILE,
            cmdline=meta["cmdline"],
            app_port=int(meta["app_port"]),
            ports=tuple(int(p) for p in meta["ports"]),
            probe_path=meta["probe"]["path"],
            probe_method=meta["probe"]["method"],
            probe_status=int(meta["probe"]["expect_status"]),
            memory_mb=int(meta["memory_mb"]),
            vcpus=int(meta["vcpus"]),
            kernel_package=meta["kernel"]["package"],
            kernel_version=meta["kernel"]["version"],
            kernel_sha256=meta["files"][KERNEL_FILE]["sha256"],
            initrd_sha256=meta["files"][INITRD_FILE]["sha256"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise VmmError(
            f"image {name!r} is damaged ({meta_path}: bad field {exc}): rebuild it with `mvm image build`"
        ) from None
    for path in (image.kernel, image.initrd):
        if not path.is_file():
            raise NotFound(f"image {name!r} is incomplete ({path} missing): run `mvm image build` again")
    return image


# ---------------------------------------------------------------- builder


@dataclass(frozen=True)
class _KernelDeb:
    package: str  # e.g. linux-image-6.1.0-56-cloud-amd64
    version: str
    sha256: str  # of the .deb, from the apt index
    filename: str  # basename of the pool file


class _Steps:
    def __init__(self, progress: Progress, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, text: str) -> None:
        self.done += 1
        self.progress(f"[{self.done}/{self.total}] {text}")


def build_image(spec_path: Path, images_dir: Path, cache_dir: Path, progress: Progress) -> Image:
    """Build the image described by `spec_path` into `images_dir/<name>/` and return it.

    The kernel .deb and its extracted tree are kept in `cache_dir` and reused. The result
    is installed by renaming a finished directory into place, so readers never see a
    half-written image; concurrent builds of the same image are serialised by a lock.
    """
    started = time.monotonic()
    spec = load_spec(Path(spec_path))
    images_dir, cache_dir = Path(images_dir).resolve(), Path(cache_dir).resolve()
    images_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    epoch = _source_date_epoch()
    step = _Steps(progress, 7)

    step(f"resolving kernel package {spec.kernel_package}")
    deb = _resolve_kernel(spec.kernel_package)
    progress(f"      {spec.kernel_package} -> {deb.package} {deb.version}")

    with _locked(cache_dir / ".kernel.lock"):
        deb_path = _fetch_deb(deb, cache_dir / "debs", step)
        root, release = _extract_kernel(deb, deb_path, cache_dir / "kernels", step)

    step(f"resolving modules {', '.join(spec.modules)}")
    modules = _resolve_modules(root, release, spec.modules)
    progress(f"      {len(modules)} modules: {' '.join(m.name for m in modules)}")

    with (
        _locked(images_dir / f".{spec.name}.lock"),
        tempfile.TemporaryDirectory(prefix=f".{spec.name}.build-", dir=images_dir) as tmp_name,
    ):
        tmp = Path(tmp_name)
        step(f"compiling {spec.name} app ({spec.app_source.name})")
        app = _compile_app(spec.app_source, tmp / "cc", epoch)

        busybox = _find_static_busybox()
        step(f"staging initramfs (busybox, init, app, {len(modules)} modules)")
        stage = tmp / "stage"
        order = _stage(stage, busybox=busybox, init=spec.init, app=app, modules=modules)

        out = tmp / spec.name
        out.mkdir()
        step(f"writing {INITRD_FILE} and {IMAGE_JSON}")
        _write_initramfs(stage, out / INITRD_FILE, epoch, tmp / "initrd.cpio")
        kernel_src = root / "boot" / f"vmlinuz-{release}"
        if not kernel_src.is_file():
            raise VmmError(f"{deb.package} {deb.version} has no boot/vmlinuz-{release}")
        shutil.copyfile(kernel_src, out / KERNEL_FILE)
        for name in (KERNEL_FILE, INITRD_FILE):
            os.chmod(out / name, 0o644)
        meta = _metadata(spec, deb, release, order, out, epoch, busybox)
        (out / IMAGE_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _install(out, images_dir / spec.name, tmp / "previous")

    image = load_image(images_dir, spec.name)
    size = image.initrd.stat().st_size
    progress(
        f"built image {spec.name} in {time.monotonic() - started:.1f} s: {images_dir / spec.name} "
        f"(initrd {size / 1e6:.2f} MB sha256 {image.initrd_sha256[:12]}, kernel {deb.package} {deb.version})"
    )
    return image


def _source_date_epoch() -> int:
    """Timestamp given to every initramfs entry: $SOURCE_DATE_EPOCH, else 0 (not the clock)."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "0")
    if not value.isdigit():
        raise InvalidRequest(f"SOURCE_DATE_EPOCH must be a non-negative integer, got {value!r}")
    return int(value)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- tools


_SBIN = ("/usr/sbin", "/sbin")  # depmod/modprobe live here and are often not on a user's PATH


def _tool(name: str) -> str:
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(_SBIN)
    found = shutil.which(name, path=path)
    if found is None:
        raise VmmError(f"{name} not found: {INSTALL_HINT}")
    return found


def _run(argv: list[str], what: str, *, cwd: Path | None = None, timeout: float = 300.0, epoch: int = 0) -> str:
    env = dict(os.environ, LC_ALL="C", SOURCE_DATE_EPOCH=str(epoch))
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise VmmError(f"{what} timed out after {timeout:.0f} s") from None
    except OSError as exc:
        raise VmmError(f"{what}: cannot run {argv[0]}: {exc}") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise VmmError(f"{what} failed (exit {proc.returncode}): {detail}")
    return proc.stdout


def _is_static_elf(path: Path) -> bool:
    """True for a 64-bit ELF without a PT_INTERP header (needs no dynamic loader)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return False
            (phoff,) = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))  # 3 = PT_INTERP


def _find_static_busybox() -> Path:
    candidates = ["/bin/busybox", "/usr/bin/busybox", shutil.which("busybox") or ""]
    for candidate in candidates:
        if candidate and _is_static_elf(Path(candidate)):
            return Path(candidate)
    raise VmmError(f"busybox-static not found (a statically linked /bin/busybox is needed): {INSTALL_HINT}")


# -- kernel


def _apt_fields(package: str) -> dict[str, str]:
    """The candidate version's control fields, from the local apt index (no network)."""
    argv = [_tool("apt-cache"), "show", "--no-all-versions", package]
    try:
        text = _run(argv, f"apt-cache show {package}", timeout=60)
    except VmmError as exc:
        raise VmmError(
            f"kernel.package {package!r} is unknown to apt ({exc}): run `apt-get update` or {INSTALL_HINT}"
        ) from None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # first stanza only
        if not line[0].isspace() and ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    if "Package" not in fields:
        raise VmmError(f"kernel.package {package!r}: apt-cache knows no installable version: run `apt-get update`")
    return fields


def _resolve_kernel(package: str) -> _KernelDeb:
    """Follow a metapackage (linux-image-cloud-amd64) to the kernel package it depends on now."""
    fields = _apt_fields(package)
    for dep in fields.get("Depends", "").split(","):
        dep_name = dep.strip().split(" ")[0].split(":")[0]
        if dep_name.startswith("linux-image-"):
            fields = _apt_fields(dep_name)
            break
    for key in ("Version", "SHA256", "Filename"):
        if key not in fields:
            raise VmmError(f"apt-cache show {fields['Package']}: no {key} field")
    return _KernelDeb(fields["Package"], fields["Version"], fields["SHA256"], Path(fields["Filename"]).name)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _fetch_deb(deb: _KernelDeb, debs_dir: Path, step: _Steps) -> Path:
    """The .deb in the cache, downloaded with `apt-get download` unless a verified copy is there."""
    debs_dir.mkdir(parents=True, exist_ok=True)
    target = debs_dir / deb.filename
    if target.is_file() and _sha256(target) == deb.sha256:
        step(f"using cached {target.name}")
        return target
    step(f"downloading {deb.package} {deb.version} with apt-get")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=debs_dir) as tmp:
        _run(
            [_tool("apt-get"), "download", f"{deb.package}={deb.version}"],
            "apt-get download",
            cwd=Path(tmp),
            timeout=900,
        )
        got = sorted(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise VmmError(f"apt-get download {deb.package}: expected one .deb, found {[p.name for p in got]}")
        if _sha256(got[0]) != deb.sha256:
            raise VmmError(f"{got[0].name}: sha256 does not match the apt index (corrupt download?)")
        os.replace(got[0], target)
    return target


def _extract_kernel(deb: _KernelDeb, deb_path: Path, kernels_dir: Path, step: _Steps) -> tuple[Path, str]:
    """Unpacked kernel tree with modules.dep, cached per package version; returns (root, release)."""
    root = kernels_dir / f"{deb.package}_{deb.version.replace(':', '%3a')}"
    if (root / ".complete").is_file():
        step(f"using extracted kernel in {root}")
    else:
        step(f"extracting {deb_path.name} and running depmod")
        kernels_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=kernels_dir))
        try:
            _run([_tool("dpkg-deb"), "-x", str(deb_path), str(tmp)], f"dpkg-deb -x {deb_path.name}")
            release = _kernel_release(tmp)
            # the .deb ships no modules.dep: Debian's postinst runs depmod on the host
            _run([_tool("depmod"), "-b", str(tmp), release], "depmod")
            (tmp / ".complete").write_text(release + "\n")
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root, _kernel_release(root)


def _kernel_release(root: Path) -> str:
    modules_dir = root / "lib" / "modules"
    releases = sorted(p.name for p in modules_dir.iterdir()) if modules_dir.is_dir() else []
    if len(releases) != 1:
        raise VmmError(f"{root}: expected one kernel release under lib/modules, found {releases}")
    return releases[0]


def _resolve_modules(root: Path, release: str, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files to load, dependencies first (modprobe -D order), without duplicates."""
    argv = [_tool("modprobe"), "-d", str(root), "-S", release, "-D", "-a", *wanted]
    try:
        text = _run(argv, "modprobe -D")
    except VmmError as exc:
        raise InvalidRequest(f"kernel.modules: cannot resolve {', '.join(wanted)} in {release}: {exc}") from None
    modules: list[Path] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "insmod" and Path(parts[1]) not in modules:
            modules.append(Path(parts[1]))
    names = [_module_name(m) for m in modules]
    if len(set(names)) != len(names):
        raise VmmError(f"kernel.modules: two modules share a file name: {names}")
    return modules


def _module_name(module: Path) -> str:
    """The name the module has in the initramfs: always uncompressed .ko."""
    name = module.name
    for suffix in (".xz", ".gz", ".zst"):
        name = name.removesuffix(suffix)
    return name


# -- app and initramfs


def _compile_app(source: Path, workdir: Path, epoch: int) -> Path:
    """gcc -static, from a copy of the source in a scratch dir so no host path reaches the binary."""
    workdir.mkdir()
    shutil.copyfile(source, workdir / "app.c")
    argv = [
        _tool("gcc"), "-static", "-O2", "-s", "-Wall", "-Wextra",
        f"-ffile-prefix-map={workdir}=.", "-o", "app", "app.c",
    ]  # fmt: skip
    _run(argv, f"gcc {source.name} (static glibc needs libc6-dev)", cwd=workdir, epoch=epoch)
    binary = workdir / "app"
    if not _is_static_elf(binary):
        raise VmmError(f"gcc produced a dynamically linked {source.name}; the initramfs has no libc")
    return binary


def _stage(stage: Path, *, busybox: Path, init: Path, app: Path, modules: list[Path]) -> list[str]:
    """Lay out the initramfs tree; returns the module load order written to /etc/modules.order."""
    for d in ("bin", "dev", "etc", "lib/modules", "proc", "root", "run", "sys", "tmp"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    # /dev/console is not staged: the kernel's built-in initramfs already has it, and
    # mknod would need root and make the archive depend on who built it.
    shutil.copyfile(busybox, stage / "bin" / "busybox")
    shutil.copyfile(app, stage / "bin" / "app")
    shutil.copyfile(init, stage / "init")
    order = []
    for module in modules:
        name = _module_name(module)
        data = module.read_bytes()
        if module.name.endswith(".xz"):
            data = lzma.decompress(data)
        elif module.name.endswith(".gz"):
            data = gzip.decompress(data)
        elif module.name.endswith(".zst"):
            raise VmmError(f"{module.name}: zstd-compressed modules are not supported")
        (stage / "lib" / "modules" / name).write_bytes(data)
        order.append(name)
    (stage / "etc" / "modules.order").write_text("".join(f"{n}\n" for n in order))
    return order


def _write_initramfs(stage: Path, target: Path, epoch: int, scratch: Path) -> None:
    """newc cpio of `stage` with sorted names, root ownership, fixed modes and mtimes, gzip -n."""
    entries: list[str] = []
    for dirpath, dirnames, filenames in os.walk(stage):
        rel = Path(dirpath).relative_to(stage)
        for name in dirnames + filenames:
            entries.append(str(rel / name) if str(rel) != "." else name)
    entries.sort()
    executables = {"init", "bin/busybox", "bin/app"}
    for entry in entries:
        path = stage / entry
        executable = path.is_dir() or entry in executables
        os.chmod(path, 0o1777 if entry == "tmp" else 0o755 if executable else 0o644)
    for entry in entries:  # after every write, so no directory mtime moves again
        os.utime(stage / entry, (epoch, epoch), follow_symlinks=False)
    listing = "".join(f"{e}\0" for e in entries).encode()
    cpio = [_tool("cpio"), "--quiet", "-o", "-H", "newc", "--null", "--reproducible", "-R", "0:0", "-O", str(scratch)]
    proc = subprocess.run(cpio, cwd=stage, input=listing, capture_output=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise VmmError(f"cpio failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace').strip()}")
    with open(target, "wb") as out:
        proc = subprocess.run(
            [_tool("gzip"), "-n", "-9", "-c", str(scratch)],
            stdout=out,
            stderr=subprocess.PIPE,
            timeout=120,
            check=False,
        )
    if proc.returncode != 0:
        raise VmmError(f"gzip failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace').strip()}")


def _package_version(package: str) -> str:
    try:
        return _run(["dpkg-query", "-W", "-f=${Version}", package], "dpkg-query", timeout=30).strip()
    except VmmError:
        return "unknown"


def _metadata(
    spec: ImageSpec, deb: _KernelDeb, release: str, modules: list[str], out: Path, epoch: int, busybox: Path
) -> dict[str, Any]:
    files = {
        name: {"sha256": _sha256(out / name), "size": (out / name).stat().st_size}
        for name in (KERNEL_FILE, INITRD_FILE)
    }
    gcc_version = _run([_tool("gcc"), "-dumpfullversion"], "gcc -dumpfullversion", timeout=30).strip()
    return {
        "format": FORMAT_VERSION,
        "name": spec.name,
        "spec": str(spec.path),
        "cmdline": spec.image_cmdline,
        "base_cmdline": spec.cmdline,
        "app_port": spec.app_port,
        "ports": list(spec.ports),
        "probe": {"method": spec.probe_method, "path": spec.probe_path, "expect_status": spec.probe_status},
        "memory_mb": spec.memory_mb,
        "vcpus": spec.vcpus,
        "kernel": {
            "metapackage": spec.kernel_package,
            "package": deb.package,
            "version": deb.version,
            "release": release,
            "deb_sha256": deb.sha256,
        },
        "modules": modules,
        "files": files,
        "build": {
            "source_date_epoch": epoch,
            "gcc": gcc_version,
            "busybox": f"{busybox} {_package_version('busybox-static')}",
            "app_source_sha256": _sha256(spec.app_source),
            "init_sha256": _sha256(spec.init),
        },
    }


def _install(new: Path, final: Path, previous: Path) -> None:
    """Move the finished image into place; the old one goes to `previous` (deleted with the temp dir)."""
    if final.exists():
        os.rename(final, previous)
    try:
        os.rename(new, final)
    except OSError:
        if previous.exists() and not final.exists():
            os.rename(previous, final)  # put the old image back rather than leave none
        raise
