"""Helpers every image builder shares: finding and running host tools, hashing, locking, installing.

Builders run Debian tools (apt-get, gcc, cpio, mkfs.ext4, buildah, ...) as subprocesses with
a timeout, and turn a failure into a one-line VmmError that names the step and the tool's
own last words, so the CLI never shows a traceback.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import os
import selectors
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import InvalidRequest, VmmError

INSTALL_HINT = "run scripts/install.sh"
Progress = Callable[[str], None]
TERM_GRACE = 10.0  # seconds between SIGTERM and SIGKILL for a build tool past its timeout

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
    """Run a tool to completion; its stdout, or a VmmError with `what` and the tail of its output.

    The tool runs in a process group of its own: past `timeout` the whole group gets SIGTERM,
    then SIGKILL after TERM_GRACE, so nothing it started outlives the build.
    """
    env = dict(os.environ, LC_ALL="C", SOURCE_DATE_EPOCH=str(epoch))
    proc = _start(argv, what, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                  errors="replace")  # fmt: skip
    with _group_ended_on_failure(proc, what, timeout):
        stdout, stderr = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        detail = (stderr or stdout).strip()[-2000:]
        raise VmmError(f"{what} failed (exit {proc.returncode}): {detail}")
    return stdout


def run_lines(
    argv: list[str],
    what: str,
    on_line: Callable[[str], None],
    *,
    timeout: float = 3600.0,
    env: dict[str, str] | None = None,
) -> None:
    """Run a tool, handing each output line (stdout and stderr) to `on_line` as it comes.

    A failure is a VmmError with `what` and the tool's last lines. The tool runs in a process
    group of its own; past `timeout` the group gets SIGTERM, then SIGKILL after TERM_GRACE.
    """
    env = dict(os.environ if env is None else env, LC_ALL="C")
    proc = _start(argv, what, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last: collections.deque[str] = collections.deque(maxlen=25)
    deadline = time.monotonic() + timeout
    with _group_ended_on_failure(proc, what, timeout):
        assert proc.stdout is not None
        for line in _lines(proc.stdout.fileno(), deadline):
            last.append(line)
            on_line(line)
        returncode = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    if returncode != 0:
        raise VmmError(f"{what} failed (exit {returncode}): {' | '.join(line for line in last if line.strip())}")


def _start(argv: list[str], what: str, **popen: Any) -> subprocess.Popen[Any]:
    """The tool in a process group of its own (so it can be ended whole), or a VmmError naming `what`."""
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, process_group=0, **popen)
    except OSError as exc:
        raise VmmError(f"{what}: cannot run {argv[0]}: {exc}") from None


@contextmanager
def _group_ended_on_failure(proc: subprocess.Popen[Any], what: str, timeout: float) -> Iterator[None]:
    """Closes the tool's pipes whatever happens; past `timeout`, or on any other failure while it is
    awaited, its whole group is ended (SIGTERM, then SIGKILL) before the error goes on."""
    with proc:
        try:
            yield
        except subprocess.TimeoutExpired:
            stop_group(proc)
            raise VmmError(f"{what} timed out after {timeout:.0f} s") from None
        except BaseException:
            stop_group(proc)
            raise


def _lines(fd: int, deadline: float) -> Iterator[str]:
    """Lines read from `fd` until EOF or `deadline` (whichever comes first), undecodable bytes replaced."""
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                yield raw.decode(errors="replace")
    if buffer:
        yield buffer.decode(errors="replace")


def stop_group(proc: subprocess.Popen[Any], grace: float | None = None) -> None:
    """SIGTERM the process group of `proc` (its own: process_group=0), then SIGKILL what is left.

    The leader is reaped only after the SIGKILL: until then its pid, the group's id, cannot be
    reused, so the signals never reach another process's group.
    """
    grace = TERM_GRACE if grace is None else grace
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not _exited(proc.pid):
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _exited(pid: int) -> bool:
    """Whether `pid` (our child) has exited, without reaping it."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


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
