"""Container images in, root filesystems out: buildah builds, skopeo reads archives, umoci unpacks.

Everything goes through an OCI image layout directory: buildah pushes a built image into
one, skopeo copies an OCI or docker archive into one, and `umoci raw unpack` applies its
layers (whiteouts included, owners and modes kept: we are root) into a plain directory.
The image config (Entrypoint, Cmd, Env, WorkingDir, User, ExposedPorts, Labels) is read
from the layout's blobs.

buildah keeps its images in the project's own store (`<state_dir>/containers`), never the
host's global one, with the overlay driver and `--isolation chroot`: no OCI runtime
(runc/crun) is needed and RUN steps share the host's network; with the host's CA bundle,
proxies and package indexes (vmm/build_trust.py), `apt-get`, `pip` and `npm` work wherever
they work on the host. Layers are cached in the store, so a rebuild reruns only the steps
after the first one whose input changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import build_trust
from .build_log import BuildLog
from .buildtools import Progress, run, run_lines, tool
from .errors import InvalidRequest, VmmError

BASE_IMAGE = "localhost/mvm/debian:bookworm"
BASE_SUITE = "bookworm"
# minbase + python3 for the examples; ca-certificates so that apps can speak TLS once given egress;
# what a person expects in `mvm shell`: ps and top (procps), less, and vi (vim-tiny).
BASE_PACKAGES = ("python3", "ca-certificates", "procps", "less", "vim-tiny")
# The base's version, a hash of what it is made of: a store holding another version makes it again.
BASE_VERSION_LABEL = "mvm.base.version"
_LAYOUT_TAG = "img"


@dataclass(frozen=True)
class ImageConfig:
    """What the OCI image config says about how to run the image."""

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: tuple[str, ...]  # "KEY=VALUE", in order
    working_dir: str
    user: str  # as written in the image: name, uid, uid:gid, name:group; "" if unset
    exposed_ports: tuple[int, ...]  # TCP only, sorted
    labels: dict[str, str]


@dataclass(frozen=True)
class Store:
    """buildah's image store under the project's state dir."""

    root: Path

    def buildah(self, *args: str) -> list[str]:
        root = self.root.resolve()
        return [tool("buildah"), "--root", str(root / "storage"), "--runroot", str(root / "run"),
                "--storage-driver", "overlay", *args]  # fmt: skip


def image_exists(store: Store, ref: str) -> bool:
    try:
        run(store.buildah("inspect", "--type", "image", ref), f"buildah inspect {ref}", timeout=60)
    except VmmError:
        return False
    return True


def remove_image(store: Store, ref: str) -> None:
    if image_exists(store, ref):
        run(store.buildah("rmi", "--force", ref), f"buildah rmi {ref}", timeout=120)


def base_version() -> str:
    """Changes when what the base is made of changes (suite, packages)."""
    return hashlib.sha256(" ".join((BASE_SUITE, *BASE_PACKAGES)).encode()).hexdigest()[:12]


def image_labels(store: Store, ref: str) -> dict[str, str] | None:
    """The labels of image `ref` in the store, None if there is no such image."""
    try:
        doc = json.loads(run(store.buildah("inspect", "--type", "image", ref), f"buildah inspect {ref}", timeout=60))
    except VmmError:
        return None
    return dict(doc.get("OCIv1", {}).get("config", {}).get("Labels") or {})


def ensure_base_image(store: Store, progress: Progress, *, force: bool = False) -> str:
    """BASE_IMAGE from Debian packages (mmdebstrap), imported into the store; a no-op when this
    version of it exists. An older one is made again (images FROM it then rebuild their steps:
    buildah's layer cache is keyed on the base image)."""
    version = base_version()
    labels = image_labels(store, BASE_IMAGE)
    if not force and labels is not None and labels.get(BASE_VERSION_LABEL) == version:
        return BASE_IMAGE
    if labels is not None and not force:
        progress(f"{BASE_IMAGE} is version {labels.get(BASE_VERSION_LABEL, '(none)')}, not {version}: making it again")
    old = image_id(store, BASE_IMAGE)
    store.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".base-", dir=store.root) as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        progress(f"mmdebstrap {BASE_SUITE} (minbase + {', '.join(BASE_PACKAGES)}) from the host's apt sources")
        run(
            [tool("mmdebstrap"), "--quiet", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
             BASE_SUITE, str(tarball)],
            "mmdebstrap", timeout=1800,
        )  # fmt: skip
        progress(f"importing it as {BASE_IMAGE}")
        container = run(store.buildah("from", "scratch"), "buildah from scratch").strip()
        try:
            run(store.buildah("add", container, str(tarball), "/"), "buildah add", timeout=600)
            run(store.buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                              "--cmd", "/bin/bash", "--label", f"{BASE_VERSION_LABEL}={version}", container),
                "buildah config")  # fmt: skip
            run(store.buildah("commit", "--quiet", "--rm", container, BASE_IMAGE), "buildah commit", timeout=600)
        except BaseException:
            run(store.buildah("rm", container), "buildah rm")
            raise
    if old is not None and old != image_id(store, BASE_IMAGE):
        remove_image_id(store, old)  # untagged now; it stays while cached build steps still use it
    return BASE_IMAGE


def build_dockerfile(
    store: Store,
    dockerfile: Path,
    context: Path,
    tag: str,
    progress: Progress,
    *,
    trust: build_trust.HostTrust | None = None,
    no_cache: bool = False,
    build_args: Mapping[str, str] | None = None,
) -> None:
    """buildah build: rootful, host network, chroot isolation, layers cached in the store.

    With `trust`, RUN steps get the host's CA bundle, proxies and package indexes (none of it
    reaches the image: vmm/build_trust.py); without it they get neither, nor the host's proxies.
    A failing step is one line naming it and its cause (vmm/build_log.py).
    """
    if not dockerfile.is_file():
        raise InvalidRequest(f"Dockerfile not found: {dockerfile}")
    if not context.is_dir():
        raise InvalidRequest(f"build context is not a directory: {context}")
    store.root.mkdir(parents=True, exist_ok=True)
    scratch = store.root / f".build-{uuid.uuid4().hex[:12]}"
    variables = trust.variables() if trust is not None else {}
    text, added = build_trust.with_trust_args(dockerfile.read_text(errors="replace"), variables)
    env = {k: v for k, v in os.environ.items() if k.upper() not in build_trust.PROXY_VARIABLES}
    with contextlib.ExitStack() as stack:
        mounts = build_trust.Mounts([], [])
        if trust is not None:
            mounts = stack.enter_context(build_trust.staged(trust, scratch))
            env.update(trust.proxies)
            progress(f"      {trust.describe()}")
        run_file = dockerfile.resolve()
        if added:
            run_file = scratch / "Dockerfile"
            run_file.write_text(text)
        argv = store.buildah(
            # --force-rm: a failed step's working container goes too (its cached steps stay as cache)
            *mounts.before, "build", "--isolation", "chroot", "--network", "host", "--layers", "--force-rm",
            f"--http-proxy={str(trust is not None).lower()}", *(["--no-cache"] if no_cache else []), *mounts.after,
            *(f"--build-arg={k}={v}" for k, v in (build_args or {}).items()),
            "-f", str(run_file), "-t", tag, str(context.resolve()),
        )  # fmt: skip
        log = BuildLog(progress, trust, 1 if added else 0)
        try:
            run_lines(argv, f"buildah build {dockerfile}", log, timeout=3600, env=env)
        except VmmError as exc:
            raise VmmError(_explain_build_failure(store, dockerfile, log, str(exc))) from None
        log.finish()
        progress(f"      {log.summary()}")


def image_id(store: Store, ref: str) -> str | None:
    """The id of image `ref` in the store, None if there is none."""
    try:
        return run(store.buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", ref),
                   f"buildah inspect {ref}", timeout=60).strip() or None  # fmt: skip
    except VmmError:
        return None


def remove_image_id(store: Store, image: str) -> None:
    """Drop an image no tag names any more, with the layers only it used; one still in use stays."""
    with contextlib.suppress(VmmError):
        run(store.buildah("rmi", image), f"buildah rmi {image}", timeout=120)


def _explain_build_failure(store: Store, dockerfile: Path, log: BuildLog, error: str) -> str:
    """Name the missing base image when that is the cause, else the failing step and its cause."""
    for line in dockerfile.read_text(errors="replace").splitlines():
        words = line.split()
        if len(words) >= 2 and words[0].upper() == "FROM":
            base = words[1]
            if base != "scratch" and not image_exists(store, base):
                hint = " (make it with `mvm image base`)" if base == BASE_IMAGE else ""
                return f"image build: base image {base} is not in the local store and could not be pulled{hint}"
    return log.explain(error)


def export_image(store: Store, ref: str, dest_rootfs: Path, progress: Progress) -> ImageConfig:
    """Unpack image `ref` from the store into `dest_rootfs` (must not exist) and return its config."""
    with tempfile.TemporaryDirectory(prefix=".export-", dir=store.root) as tmp:
        layout = Path(tmp) / "layout"
        run(store.buildah("push", "--quiet", ref, f"oci:{layout}:{_LAYOUT_TAG}"), f"buildah push {ref}", timeout=1800)
        return _unpack(layout, dest_rootfs, progress)


def save_archive(store: Store, ref: str, archive: Path, fmt: str = "oci-archive") -> None:
    """Write image `ref` as an oci-archive or docker-archive tarball."""
    if fmt not in ("oci-archive", "docker-archive"):
        raise InvalidRequest(f"archive format must be oci-archive or docker-archive, got {fmt!r}")
    suffix = f":{ref}" if fmt == "docker-archive" else ""
    run(store.buildah("push", "--quiet", ref, f"{fmt}:{archive}{suffix}"), f"buildah push {fmt}", timeout=1800)


def import_archive(archive: Path, dest_rootfs: Path, progress: Progress) -> ImageConfig:
    """An OCI image archive or a docker-archive tarball -> rootfs + config, without the store."""
    if not archive.is_file():
        raise InvalidRequest(f"archive not found: {archive}")
    transport = _archive_transport(archive)
    with tempfile.TemporaryDirectory(prefix=".import-", dir=dest_rootfs.parent) as tmp:
        layout = Path(tmp) / "layout"
        progress(f"      reading {archive.name} as {transport}")
        try:
            run([tool("skopeo"), "copy", "--quiet", f"{transport}:{archive.resolve()}", f"oci:{layout}:{_LAYOUT_TAG}"],
                f"skopeo copy {archive.name}", timeout=1800)  # fmt: skip
        except VmmError as exc:
            raise InvalidRequest(f"import: {archive} is not a usable {transport}: {exc}") from None
        return _unpack(layout, dest_rootfs, progress)


def _archive_transport(archive: Path) -> str:
    """oci-archive (has oci-layout/index.json) or docker-archive (has manifest.json), by the tar's members."""
    try:
        with tarfile.open(archive) as tar:
            names = {name.removeprefix("./") for name in tar.getnames()}
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InvalidRequest(f"import: {archive} is not an OCI or docker archive: {exc}") from None
    if "oci-layout" in names and "index.json" in names:
        return "oci-archive"
    if "manifest.json" in names:
        return "docker-archive"
    raise InvalidRequest(f"import: {archive} is not an OCI or docker archive (no index.json or manifest.json)")


def _unpack(layout: Path, dest_rootfs: Path, progress: Progress) -> ImageConfig:
    config = _read_config(layout)
    progress("      checking blob digests")
    check_blobs(layout)
    progress("      applying layers with umoci")
    try:
        run([tool("umoci"), "raw", "unpack", "--image", f"{layout}:{_LAYOUT_TAG}", str(dest_rootfs)],
            "umoci raw unpack", timeout=1800)  # fmt: skip
    except BaseException:
        shutil.rmtree(dest_rootfs, ignore_errors=True)
        raise
    return config


def check_blobs(layout: Path) -> None:
    """Every blob the one image of `layout` uses (manifest, config, layers) has its digest and size.

    umoci trusts the layout it is given, and a damaged layer would become a damaged disk.
    """
    index = json.loads((layout / "index.json").read_bytes())
    manifest_descriptor = index["manifests"][0]
    manifest = _blob(layout, manifest_descriptor.get("digest"))
    for descriptor in (manifest_descriptor, manifest["config"], *manifest.get("layers", [])):
        _check_blob(layout, descriptor)


def _check_blob(layout: Path, descriptor: Any) -> None:
    digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
    path = _blob_path(layout, digest)
    sha = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                sha.update(block)
                size += len(block)
    except OSError as exc:
        raise InvalidRequest(f"image blob {digest} is missing: {exc.strerror}") from None
    if f"sha256:{sha.hexdigest()}" != digest:
        raise InvalidRequest(f"image blob {digest} does not match its digest (sha256:{sha.hexdigest()}): it is damaged")
    if isinstance(descriptor.get("size"), int) and descriptor["size"] != size:
        raise InvalidRequest(f"image blob {digest} has {size} bytes, its descriptor says {descriptor['size']}")


def _blob_path(layout: Path, digest: Any) -> Path:
    if not isinstance(digest, str) or not digest.startswith("sha256:") or "/" in digest:
        raise VmmError(f"OCI layout {layout}: bad digest {digest!r}")
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _blob(layout: Path, digest: Any) -> Any:
    path = _blob_path(layout, digest)
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise VmmError(f"OCI layout {layout}: cannot read blob {digest}: {exc}") from None


def _read_config(layout: Path) -> ImageConfig:
    """index.json -> the one manifest -> its config blob."""
    try:
        index = json.loads((layout / "index.json").read_bytes())
        manifests = index["manifests"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VmmError(f"OCI layout {layout}: bad index.json: {exc}") from None
    if len(manifests) != 1:
        raise InvalidRequest(f"the archive holds {len(manifests)} images; import needs exactly one")
    manifest = _blob(layout, manifests[0].get("digest"))
    if not isinstance(manifest, dict) or "config" not in manifest:
        raise InvalidRequest("the image's manifest is an index of several platforms; import one platform's image")
    raw = _blob(layout, manifest["config"].get("digest")).get("config") or {}
    ports = []
    for key in raw.get("ExposedPorts") or {}:
        number, _, proto = str(key).partition("/")
        if (proto or "tcp") == "tcp" and number.isdigit():
            ports.append(int(number))
    return ImageConfig(
        entrypoint=tuple(raw.get("Entrypoint") or ()),
        cmd=tuple(raw.get("Cmd") or ()),
        env=tuple(raw.get("Env") or ()),
        working_dir=str(raw.get("WorkingDir") or ""),
        user=str(raw.get("User") or ""),
        exposed_ports=tuple(sorted(set(ports))),
        labels={str(k): str(v) for k, v in (raw.get("Labels") or {}).items()},
    )
