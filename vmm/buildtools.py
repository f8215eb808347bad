"""Helpers every image builder shares: finding and running host tools, hashing, locking, installing.

Builders run Debian tools (apt-get, gcc, cpio, mkfs.ext4, buildah, ...) as subprocesses with
a timeout, and turn a failure into a one-line VmmError that names the step and the tool's
own last words, so the CLI never shows a traceback.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import os
import shutil
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InvalidRequest, VmmError

INSTALL_HINT = "run scripts/install.sh"
Progress = Callable[[str], None]

_SBIN = ("/usr/sbin", "/sbin")  # depmod, modprobe and mkfs.ext4 live here and are often not on a user's PATH


class Steps:
    """Numbered progress lines: `[3/7] compiling ...`."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, text: str) -> None:
        self.done += 1
        self.progress(f"[{self.done}/{self.total}] {text}")


def source_date_epoch() -> int:
    """Timestamp given to every built file: $SOURCE_DATE_EPOCH, else 0 (not the clock)."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "0")
    if not value.isdigit():
        raise InvalidRequest(f"SOURCE_DATE_EPOCH must be a non-negative integer, got {value!r}")
    return int(value)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` for the block: concurrent builds of one thing take turns."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def tool(name: str) -> str:
    """Absolute path of a host tool, or a VmmError telling the user how to install it."""
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(_SBIN)
    found = shutil.which(name, path=path)
    if found is None:
        raise VmmError(f"{name} not found: {INSTALL_HINT}")
    return found


def run(argv: list[str], what: str, *, cwd: Path | None = None, timeout: float = 300.0, epoch: int = 0) -> str:
    """Run a tool to completion; its stdout, or a VmmError with `what` and the tail of its output."""
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


def run_lines(argv: list[str], what: str, on_line: Callable[[str], None], *, timeout: float = 3600.0) -> None:
    """Run a tool, handing each output line (stdout and stderr) to `on_line` as it comes.

    A failure is a VmmError with `what` and the tool's last lines; a tool past `timeout` is killed.
    """
    env = dict(os.environ, LC_ALL="C")
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, errors="replace", env=env)  # fmt: skip
    except OSError as exc:
        raise VmmError(f"{what}: cannot run {argv[0]}: {exc}") from None
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    last: collections.deque[str] = collections.deque(maxlen=25)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            last.append(line)
            on_line(line)
        returncode = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if returncode != 0:
        if returncode == -9 and not timer.is_alive():
            raise VmmError(f"{what} timed out after {timeout:.0f} s")
        raise VmmError(f"{what} failed (exit {returncode}): {' | '.join(line for line in last if line.strip())}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def is_static_elf(path: Path) -> bool:
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


def find_static_busybox() -> Path:
    candidates = ["/bin/busybox", "/usr/bin/busybox", shutil.which("busybox") or ""]
    for candidate in candidates:
        if candidate and is_static_elf(Path(candidate)):
            return Path(candidate)
    raise VmmError(f"busybox-static not found (a statically linked /bin/busybox is needed): {INSTALL_HINT}")


def compile_static(source: Path, workdir: Path, epoch: int, companions: tuple[Path, ...] = ()) -> Path:
    """gcc -static, from a copy of the sources in a scratch dir so no host path reaches the binary.

    `companions` are further .c and .h files of the same program.
    """
    workdir.mkdir(parents=True)
    for file in (source, *companions):
        shutil.copyfile(file, workdir / file.name)
    units = [f.name for f in (source, *companions) if f.suffix == ".c"]
    argv = [
        tool("gcc"), "-static", "-O2", "-s", "-Wall", "-Wextra",
        f"-ffile-prefix-map={workdir}=.", "-o", "out", *units,
    ]  # fmt: skip
    run(argv, f"gcc {source.name} (static glibc needs libc6-dev)", cwd=workdir, epoch=epoch)
    binary = workdir / "out"
    if not is_static_elf(binary):
        raise VmmError(f"gcc produced a dynamically linked {source.name}; the guest has no libc for it")
    return binary


def package_version(package: str) -> str:
    try:
        return run(["dpkg-query", "-W", "-f=${Version}", package], "dpkg-query", timeout=30).strip()
    except VmmError:
        return "unknown"


def install_dir(new: Path, final: Path, previous: Path) -> None:
    """Move a finished directory into place; the old one goes to `previous` (the caller deletes it)."""
    if final.exists():
        os.rename(final, previous)
    try:
        os.rename(new, final)
    except OSError:
        if previous.exists() and not final.exists():
            os.rename(previous, final)  # put the old one back rather than leave none
        raise
