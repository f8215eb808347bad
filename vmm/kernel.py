"""Guest kernels: a Debian kernel package, fetched with apt and unpacked once into a cache.

The builders take `vmlinuz` and the virtio modules from here. Nothing is installed on the
host: the .deb is downloaded with `apt-get download`, checked against the apt index's
sha256 and unpacked with dpkg-deb; depmod writes the modules.dep the package lacks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .buildtools import INSTALL_HINT, Steps, locked, run, sha256_file, tool
from .errors import InvalidRequest, VmmError


@dataclass(frozen=True)
class KernelDeb:
    package: str  # e.g. linux-image-6.1.0-56-cloud-amd64
    version: str
    sha256: str  # of the .deb, from the apt index
    filename: str  # basename of the pool file



@dataclass(frozen=True)
class KernelTree:
    """An unpacked kernel package: `root/boot/vmlinuz-<release>` and `root/lib/modules/<release>`."""

    deb: KernelDeb
    root: Path
    release: str

    @property
    def vmlinuz(self) -> Path:
        path = self.root / "boot" / f"vmlinuz-{self.release}"
        if not path.is_file():
            raise VmmError(f"{self.deb.package} {self.deb.version} has no boot/vmlinuz-{self.release}")
        return path


def prepare(package: str, cache_dir: Path, step: Steps) -> KernelTree:
    """Resolve `package` (a metapackage is followed), fetch and unpack it into the cache; 3 steps."""
    step(f"resolving kernel package {package}")
    deb = _resolve_kernel(package)
    step.progress(f"      {package} -> {deb.package} {deb.version}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with locked(cache_dir / ".kernel.lock"):
        deb_path = _fetch_deb(deb, cache_dir / "debs", step)
        root, release = _extract_kernel(deb, deb_path, cache_dir / "kernels", step)
    return KernelTree(deb, root, release)


def _apt_fields(package: str) -> dict[str, str]:
    """The candidate version's control fields, from the local apt index (no network)."""
    argv = [tool("apt-cache"), "show", "--no-all-versions", package]
    try:
        text = run(argv, f"apt-cache show {package}", timeout=60)
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


def _resolve_kernel(package: str) -> KernelDeb:
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
    return KernelDeb(fields["Package"], fields["Version"], fields["SHA256"], Path(fields["Filename"]).name)


def _fetch_deb(deb: KernelDeb, debs_dir: Path, step: Steps) -> Path:
    """The .deb in the cache, downloaded with `apt-get download` unless a verified copy is there."""
    debs_dir.mkdir(parents=True, exist_ok=True)
    target = debs_dir / deb.filename
    if target.is_file() and sha256_file(target) == deb.sha256:
        step(f"using cached {target.name}")
        return target
    step(f"downloading {deb.package} {deb.version} with apt-get")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=debs_dir) as tmp:
        run(
            [tool("apt-get"), "download", f"{deb.package}={deb.version}"],
            "apt-get download",
            cwd=Path(tmp),
            timeout=900,
        )
        got = sorted(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise VmmError(f"apt-get download {deb.package}: expected one .deb, found {[p.name for p in got]}")
        if sha256_file(got[0]) != deb.sha256:
            raise VmmError(f"{got[0].name}: sha256 does not match the apt index (corrupt download?)")
        os.replace(got[0], target)
    return target


def _extract_kernel(deb: KernelDeb, deb_path: Path, kernels_dir: Path, step: Steps) -> tuple[Path, str]:
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
            run([tool("dpkg-deb"), "-x", str(deb_path), str(tmp)], f"dpkg-deb -x {deb_path.name}")
            release = _kernel_release(tmp)
            # the .deb ships no modules.dep: Debian's postinst runs depmod on the host
            run([tool("depmod"), "-b", str(tmp), release], "depmod")
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


def resolve_modules(kernel: KernelTree, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files to load, dependencies first (modprobe -D order), without duplicates."""
    argv = [tool("modprobe"), "-d", str(kernel.root), "-S", kernel.release, "-D", "-a", *wanted]
    try:
        text = run(argv, "modprobe -D")
    except VmmError as exc:
        raise InvalidRequest(f"kernel.modules: cannot resolve {', '.join(wanted)} in {kernel.release}: {exc}") from None
    modules: list[Path] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "insmod" and Path(parts[1]) not in modules:
            modules.append(Path(parts[1]))
    names = [module_name(m) for m in modules]
    if len(set(names)) != len(names):
        raise VmmError(f"kernel.modules: two modules share a file name: {names}")
    return modules


def module_name(module: Path) -> str:
    """The name the module has in the initramfs: always uncompressed .ko."""
    name = module.name
    for suffix in (".xz", ".gz", ".zst"):
        name = name.removesuffix(suffix)
    return name
