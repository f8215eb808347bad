"""Initramfs archives: a staged tree of busybox, an init, kernel modules and binaries, packed reproducibly.

Entries are sorted, owned by root, with fixed modes and mtimes (`cpio --reproducible`,
`gzip -n`), so the same inputs give a byte-identical archive.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import subprocess
from pathlib import Path

from .buildtools import tool
from .errors import VmmError
from .kernel import module_name


def stage(root: Path, *, busybox: Path, init: Path, modules: list[Path], binaries: dict[str, Path]) -> list[str]:
    """Lay out the initramfs tree; returns the module load order written to /etc/modules.order.

    `binaries` maps a path inside the archive (e.g. bin/app) to the file to put there.
    """
    for d in ("bin", "dev", "etc", "lib/modules", "proc", "root", "run", "sys", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    # /dev/console is not staged: the kernel's built-in initramfs already has it, and
    # mknod would need root and make the archive depend on who built it.
    shutil.copyfile(busybox, root / "bin" / "busybox")
    for inside, source in binaries.items():
        shutil.copyfile(source, root / inside)
    shutil.copyfile(init, root / "init")
    order = []
    for module in modules:
        name = module_name(module)
        data = module.read_bytes()
        if module.name.endswith(".xz"):
            data = lzma.decompress(data)
        elif module.name.endswith(".gz"):
            data = gzip.decompress(data)
        elif module.name.endswith(".zst"):
            raise VmmError(f"{module.name}: zstd-compressed modules are not supported")
        (root / "lib" / "modules" / name).write_bytes(data)
        order.append(name)
    (root / "etc" / "modules.order").write_text("".join(f"{n}\n" for n in order))
    return order


def write(stage: Path, target: Path, epoch: int, scratch: Path, executables: set[str]) -> None:
    """newc cpio of `stage` with sorted names, root ownership, fixed modes and mtimes, gzip -n."""
    entries: list[str] = []
    for dirpath, dirnames, filenames in os.walk(stage):
        rel = Path(dirpath).relative_to(stage)
        for name in dirnames + filenames:
            entries.append(str(rel / name) if str(rel) != "." else name)
    entries.sort()
    for entry in entries:
        path = stage / entry
        executable = path.is_dir() or entry in {"init", "bin/busybox", *executables}
        os.chmod(path, 0o1777 if entry == "tmp" else 0o755 if executable else 0o644)
    for entry in entries:  # after every write, so no directory mtime moves again
        os.utime(stage / entry, (epoch, epoch), follow_symlinks=False)
    listing = "".join(f"{e}\0" for e in entries).encode()
    cpio = [tool("cpio"), "--quiet", "-o", "-H", "newc", "--null", "--reproducible", "-R", "0:0", "-O", str(scratch)]
    proc = subprocess.run(cpio, cwd=stage, input=listing, capture_output=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise VmmError(f"cpio failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace').strip()}")
    with open(target, "wb") as out:
        proc = subprocess.run(
            [tool("gzip"), "-n", "-9", "-c", str(scratch)],
            stdout=out,
            stderr=subprocess.PIPE,
            timeout=120,
            check=False,
        )
    if proc.returncode != 0:
        raise VmmError(f"gzip failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace').strip()}")

