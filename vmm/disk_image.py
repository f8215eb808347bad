"""Your app as a guest image: a Dockerfile or an OCI/docker archive becomes a bootable root disk.

The image's filesystem becomes a sparse ext4 disk (`mkfs.ext4 -d`, no loop mount) with the
guest init injected at /mvm/init and the image's run config (Entrypoint + Cmd, Env,
WorkingDir, User) written to /mvm/config for it. The kernel is the same Debian cloud
kernel as the demo's; a tiny busybox initramfs (guest/stage1/init) loads the virtio
modules, mounts the disk and hands over to /mvm/init.

What the host needs beyond the image config comes from labels or build flags (flags win):
- `mvm.port`: the app port (default: the only EXPOSEd TCP port);
- `mvm.ready`: `tcp` (the app port accepts) or `http:/path` (GET answers 200); default tcp;
- `mvm.memory_mb`, `mvm.vcpus`, `mvm.disk_mb`: the VM's size (defaults 512, 1, 1024);
- `mvm.port.<n>.protocol`: `h2c` for a port that speaks prior-knowledge HTTP/2 (gRPC), else `http`;
- `mvm.exec.aslr`: `off` runs what the guest agent spawns (exec, files, shell) without address-space
  randomisation, a hardening traded for exec latency under TCG; `on` (the default) keeps it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import build_trust, capacity, hooks, initramfs, kernel, oci, port_protocols
from .buildtools import (
    Progress,
    Steps,
    compile_static,
    find_static_busybox,
    install_dir,
    locked,
    run,
    sha256_file,
    source_date_epoch,
    tool,
)
from .errors import InvalidRequest
from .image import (
    DISK_FILE,
    FORMAT_VERSION,
    INITRD_FILE,
    KERNEL_FILE,
    Image,
    Readiness,
    check_name,
    load_image,
    write_metadata,
)

REPO = Path(__file__).resolve().parent.parent
GUEST_INIT_SOURCE = REPO / "guest" / "init" / "mvm-init.c"
EXEC_ASLR_LABEL = "mvm.exec.aslr"
GUEST_INIT_COMPANIONS = tuple(
    REPO / "guest" / "init" / name for name in ("agent.c", "agent.h", "files.c", "files.h", "hooks.c", "hooks.h")
)
STAGE1_INIT = REPO / "guest" / "stage1" / "init"
KERNEL_PACKAGE = "linux-image-cloud-amd64"
STAGE1_MODULES = ("virtio_mmio", "virtio_net", "virtio_blk", "virtio_console")
CMDLINE = "console=ttyS0 reboot=t panic=-1 quiet"
DEFAULTS = {"memory_mb": 512, "vcpus": 1, "disk_mb": 1024}
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# ext4 metadata (inode tables, journal) on top of the files, and room to start writing
_FS_OVERHEAD = 1.15
_FS_SLACK_MB = 48
_READY_RE = re.compile(r"^(tcp|http:(/[\x21-\x7e]*))$")


@dataclass(frozen=True)
class BuildOptions:
    """What `mvm image build` flags say; None means "from the image's labels, else the default"."""

    name: str | None = None
    port: int | None = None
    ready: str | None = None  # tcp | http:/path
    memory_mb: int | None = None
    vcpus: int | None = None
    disk_mb: int | None = None
    hooks: str | None = None  # comma list of events with HTTP hooks (default: LABEL mvm.hooks)
    no_cache: bool = False  # Dockerfile builds: run every step again instead of reusing cached layers
    host_trust: bool = True  # Dockerfile builds: RUN steps get the host's CAs, proxies, indexes (build_trust)
    ca_files: tuple[Path, ...] = ()  # more CA files for RUN steps to trust
    build_args: dict[str, str] = field(default_factory=dict)  # --build-arg KEY=VALUE
    port_protocols: dict[int, str] = field(default_factory=dict)  # --port-protocol N=h2c: as the label says


@dataclass(frozen=True)
class RunConfig:
    """What /mvm/init runs, resolved on the host from the image config and the rootfs."""

    argv: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    uid: int
    gid: int
    hostname: str
    ports: tuple[int, ...]
    exec_aslr: bool = True  # the agent's execs run with address-space randomisation (mvm.exec.aslr)

    def render(self) -> str:
        """/mvm/config: one `key value` per line (see guest/init/mvm-init.c)."""
        lines = [f"arg {a}" for a in self.argv] + [f"env {e}" for e in self.env]
        lines += [f"cwd {self.cwd}", f"uid {self.uid}", f"gid {self.gid}", f"hostname {self.hostname}"]
        lines += [f"port {p}" for p in self.ports]
        lines += [] if self.exec_aslr else ["exec_aslr off"]
        for line in lines:
            if "\n" in line or "\0" in line or "\r" in line:
                raise InvalidRequest(f"image config value {line!r} has a line break or NUL: the guest init refuses it")
        return "".join(f"{line}\n" for line in lines)


def build_from_dockerfile(
    dockerfile: Path,
    context: Path | None,
    options: BuildOptions,
    images_dir: Path,
    state_dir: Path,
    progress: Progress,
) -> Image:
    """`mvm image build --dockerfile`: buildah builds it, then it becomes a disk image."""
    dockerfile = Path(dockerfile)
    context = Path(context) if context is not None else dockerfile.parent
    if not dockerfile.is_file():
        raise InvalidRequest(f"Dockerfile not found: {dockerfile}")
    if not context.is_dir():
        raise InvalidRequest(f"build context is not a directory: {context}")
    name = check_name(options.name or _name_from(dockerfile.resolve().parent.name))
    store = oci.Store(state_dir / "containers")
    trust = build_trust.from_host(os.environ, options.ca_files) if options.host_trust else None
    build_args = build_trust.check_build_args(options.build_args, "build.args")
    # The built image stays in buildah's store under this tag: its layers are the next build's cache.
    tag = f"localhost/mvm/build/{name}"

    def rootfs(dest: Path, step: Steps) -> oci.ImageConfig:
        step(f"building {dockerfile} with buildah{' (no cache)' if options.no_cache else ''}")
        previous = oci.image_id(store, tag)
        oci.build_dockerfile(store, dockerfile, context, tag, progress, trust=trust, no_cache=options.no_cache,
                             build_args=build_args)  # fmt: skip
        step("exporting the image's filesystem")
        config = oci.export_image(store, tag, dest, progress)
        if previous is not None and previous != oci.image_id(store, tag):
            oci.remove_image_id(store, previous)
        return config

    return _build(name, f"dockerfile:{dockerfile.resolve()}", rootfs, options, images_dir, state_dir, progress)


def build_from_archive(
    archive: Path, options: BuildOptions, images_dir: Path, state_dir: Path, progress: Progress
) -> Image:
    """`mvm image import`: an OCI or docker archive becomes a disk image."""
    archive = Path(archive)
    if not archive.is_file():
        raise InvalidRequest(f"archive not found: {archive}")
    stem = archive.name.split(".")[0]
    name = check_name(options.name or _name_from(stem))

    def rootfs(dest: Path, step: Steps) -> oci.ImageConfig:
        step(f"unpacking {archive.name}")
        return oci.import_archive(archive, dest, progress)

    return _build(name, f"archive:{archive.resolve()}", rootfs, options, images_dir, state_dir, progress)


def _name_from(text: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63]
    if not name:
        raise InvalidRequest(f"cannot make an image name from {text!r}: pass --name")
    return name


def _build(
    name: str,
    source: str,
    make_rootfs: Callable[[Path, Steps], oci.ImageConfig],
    options: BuildOptions,
    images_dir: Path,
    state_dir: Path,
    progress: Progress,
) -> Image:
    started = time.monotonic()
    images_dir = Path(images_dir).resolve()
    images_dir.mkdir(parents=True, exist_ok=True)
    epoch = source_date_epoch()
    step = Steps(progress, 9 if source.startswith("dockerfile:") else 8)
    tree = kernel.prepare(KERNEL_PACKAGE, Path(state_dir) / "cache", step)
    step(f"resolving modules {', '.join(STAGE1_MODULES)}")
    modules = kernel.resolve_modules(tree, STAGE1_MODULES)

    with (
        locked(images_dir / f".{name}.lock"),
        tempfile.TemporaryDirectory(prefix=f".{name}.build-", dir=images_dir) as tmp_name,
    ):
        tmp = Path(tmp_name)
        rootfs = tmp / "rootfs"
        config: oci.ImageConfig = make_rootfs(rootfs, step)
        if options.port_protocols:  # flags win over labels, and are kept as the labels they stand for
            flags = {f"mvm.port.{port}.protocol": proto for port, proto in options.port_protocols.items()}
            config = replace(config, labels={**config.labels, **flags})
        settings = _settings(config, options)
        run_config = _run_config(config, rootfs, settings["port"], name)
        image_hooks = hooks.from_image(config.labels, options.hooks, settings["port"], rootfs)
        port_protocols.h2c_ports(config.labels, run_config.ports)  # a bad label fails before the slow steps

        step("compiling the guest init (guest/init/mvm-init.c)")
        init = compile_static(GUEST_INIT_SOURCE, tmp / "cc", epoch, GUEST_INIT_COMPANIONS)
        _inject(rootfs, init, run_config)

        out = tmp / name
        out.mkdir()
        step(f"writing the {settings['disk_mb']} MiB root disk (mkfs.ext4 -d)")
        used = _make_ext4(rootfs, out / DISK_FILE, settings["disk_mb"])
        progress(f"      {used / 2**20:.0f} MiB of files on a {settings['disk_mb']} MiB disk (sparse)")

        step("writing the stage-1 initramfs")
        stage = tmp / "stage"
        initramfs.stage(stage, busybox=find_static_busybox(), init=STAGE1_INIT, modules=modules, binaries={})
        initramfs.write(stage, out / INITRD_FILE, epoch, tmp / "initrd.cpio", set())
        shutil.copyfile(tree.vmlinuz, out / KERNEL_FILE)
        for file in (KERNEL_FILE, INITRD_FILE):
            os.chmod(out / file, 0o644)
        meta = _metadata(name, source, tree, out, config, run_config, settings)
        meta["hooks"] = image_hooks.to_dict()
        write_metadata(out, meta)
        install_dir(out, images_dir / name, tmp / "previous")

    image = load_image(images_dir, name)
    progress(f"built image {name} in {time.monotonic() - started:.1f} s: {images_dir / name}")
    return image


_LABEL_BOUNDS = {
    "port": (1, 65535),
    "memory_mb": (capacity.MIN_MEMORY_MB, capacity.MAX_MEMORY_MB),
    "vcpus": (1, capacity.MAX_VCPUS),
    "disk_mb": (64, capacity.MAX_DISK_MB),
}


def _label_int(config: oci.ImageConfig, key: str) -> int | None:
    """An `mvm.<key>` label's number, None when absent; any value out of its bounds (0 too) is refused."""
    value = config.labels.get(f"mvm.{key}")
    if value is None:
        return None
    low, high = _LABEL_BOUNDS[key]
    if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
        raise InvalidRequest(f"label mvm.{key}={value!r} must be a whole number in [{low}, {high}]")
    return int(value)


def _settings(config: oci.ImageConfig, options: BuildOptions) -> dict[str, Any]:
    """Port, readiness and sizes: flag, else label, else default; validated with the key named."""
    port = options.port if options.port is not None else _label_int(config, "port")
    if port is None:
        if len(config.exposed_ports) != 1:
            found = ", ".join(map(str, config.exposed_ports)) or "none"
            raise InvalidRequest(
                f"which port is the app's? the image exposes {found}: EXPOSE one port, "
                "set LABEL mvm.port=<port> or pass --port"
            )
        port = config.exposed_ports[0]
    if not 1 <= port <= 65535:
        raise InvalidRequest(f"port must be in [1, 65535], got {port}")
    ready = options.ready or config.labels.get("mvm.ready", "tcp")
    if not _READY_RE.match(ready):
        raise InvalidRequest(f"ready must be 'tcp' or 'http:/path', got {ready!r}")
    sizes = {}
    for key, default in DEFAULTS.items():
        flag = getattr(options, key)
        label = _label_int(config, key) if flag is None else None
        sizes[key] = flag if flag is not None else label if label is not None else default
    capacity.check_limits(sizes["memory_mb"], sizes["vcpus"], sizes["disk_mb"], "image")
    if sizes["disk_mb"] < 64:
        raise InvalidRequest(f"image.disk_mb must be at least 64, got {sizes['disk_mb']}")
    return {"port": port, "ready": ready, **sizes}


def _run_config(config: oci.ImageConfig, rootfs: Path, port: int, name: str) -> RunConfig:
    argv = (*config.entrypoint, *config.cmd)
    if not argv:
        raise InvalidRequest("the image has neither ENTRYPOINT nor CMD: nothing to run")
    env = config.env if any(e.startswith("PATH=") for e in config.env) else (DEFAULT_PATH, *config.env)
    uid, gid = _resolve_user(config.user, rootfs)
    ports = (port, *(p for p in config.exposed_ports if p != port))
    return RunConfig(argv, env, config.working_dir or "/", uid, gid, name, ports, _exec_aslr(config.labels))


def _exec_aslr(labels: dict[str, str]) -> bool:
    """`mvm.exec.aslr`: `on` (the default) or `off`. Off, the agent spawns without address-space randomisation:
    TCG keys translated code by address, so a dynamic loader and libc at the same place every time are not
    translated again at each exec (exec `true` about 3.5x faster under TCG), and their addresses are guessable."""
    value = labels.get(EXEC_ASLR_LABEL, "on")
    if value not in ("on", "off"):
        raise InvalidRequest(f"label {EXEC_ASLR_LABEL}={value!r}: must be on or off")
    return value == "on"


def _resolve_user(user: str, rootfs: Path) -> tuple[int, int]:
    """USER as the image says it (name, uid, name:group, uid:gid) -> numeric ids from its own files."""
    if not user:
        return 0, 0
    who, _, group = user.partition(":")
    passwd = _id_table(rootfs / "etc" / "passwd")
    if who.isdigit():
        uid = int(who)
        gid = next((int(row[3]) for row in passwd.values() if row[2] == who), 0)
    elif who in passwd:
        uid, gid = int(passwd[who][2]), int(passwd[who][3])
    else:
        raise InvalidRequest(f"USER {user!r}: no user {who!r} in the image's /etc/passwd")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            groups = _id_table(rootfs / "etc" / "group")
            if group not in groups:
                raise InvalidRequest(f"USER {user!r}: no group {group!r} in the image's /etc/group")
            gid = int(groups[group][2])
    return uid, gid


def _id_table(path: Path) -> dict[str, list[str]]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return {}
    rows = [line.split(":") for line in lines if line and not line.startswith("#")]
    return {row[0]: row for row in rows if len(row) >= 4 and row[2].isdigit()}


def _inject(rootfs: Path, init: Path, run_config: RunConfig) -> None:
    """/mvm/init and /mvm/config, owned by root; mount points the init needs."""
    mvm = rootfs / "mvm"
    if mvm.is_symlink() or (mvm.exists() and not mvm.is_dir()):
        raise InvalidRequest("the image has its own /mvm, which the guest init needs: remove it")
    mvm.mkdir(mode=0o755, exist_ok=True)
    shutil.copyfile(init, mvm / "init")
    os.chmod(mvm / "init", 0o755)
    (mvm / "config").write_text(run_config.render(), encoding="utf-8")
    os.chmod(mvm / "config", 0o644)
    for d in ("proc", "sys", "dev", "run", "tmp"):
        path = rootfs / d
        if not path.exists() and not path.is_symlink():
            path.mkdir(mode=0o1777 if d == "tmp" else 0o755)


def _make_ext4(rootfs: Path, out: Path, disk_mb: int) -> int:
    """The rootfs as a sparse ext4 file; returns the bytes of files in it."""
    used = int(run([tool("du"), "-s", "-B1", "-x", str(rootfs)], "du").split()[0])
    need_mb = int(used * _FS_OVERHEAD / 2**20) + _FS_SLACK_MB
    if need_mb > disk_mb:
        raise InvalidRequest(
            f"the image's files need about {need_mb} MiB, more than its {disk_mb} MiB disk: "
            "pass --disk-mb or set LABEL mvm.disk_mb"
        )
    capacity.check_free_space(out.parent, used, "the root disk")
    argv = [
        tool("mkfs.ext4"), "-q", "-F", "-L", "mvm-root", "-m", "0",
        # Initialise inode tables and journal now: lazy init would write into every VM's overlay.
        "-E", "lazy_itable_init=0,lazy_journal_init=0",
        "-d", str(rootfs), str(out), f"{disk_mb}M",
    ]  # fmt: skip
    run(argv, "mkfs.ext4 -d", timeout=1800)
    return used


def _metadata(
    name: str,
    source: str,
    tree: kernel.KernelTree,
    out: Path,
    config: oci.ImageConfig,
    run_config: RunConfig,
    settings: dict[str, Any],
) -> dict[str, Any]:
    ready = settings["ready"]
    probe = Readiness("tcp", settings["port"]) if ready == "tcp" else Readiness("http", settings["port"], ready[5:])
    return {
        "format": FORMAT_VERSION,
        "kind": "disk",
        "name": name,
        "source": source,
        "cmdline": CMDLINE,
        "app_port": settings["port"],
        "ports": list(run_config.ports),
        "probe": probe.to_dict(),
        "memory_mb": settings["memory_mb"],
        "vcpus": settings["vcpus"],
        "disk_mb": settings["disk_mb"],
        "kernel": {"package": tree.deb.package, "version": tree.deb.version, "release": tree.release},
        "files": {f: {"sha256": sha256_file(out / f)} for f in (KERNEL_FILE, INITRD_FILE)},
        "run": {"argv": list(run_config.argv), "env": list(run_config.env), "cwd": run_config.cwd,
                "uid": run_config.uid, "gid": run_config.gid},
        "labels": config.labels,
        "build_id": uuid.uuid4().hex,
        "created_at": time.time(),
    }
