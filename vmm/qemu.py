"""QEMU processes: the argv of a microVM, spawning it in its namespace, watching it die.

QEMU is spawned in its own session (not in the manager's process group) so that a
restart of the manager leaves running VMs alone; they are re-adopted by pid. Exits are
seen through a pidfd, which works the same for children and for re-adopted processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .accel import Accelerator
from .confine import Confinement
from .errors import VmmError
from .network import netns

QMP_SOCKET = "qmp.sock"
SERIAL_LOG = "serial.log"  # the guest kernel's console (ttyS0)
APP_LOG = "app.log"  # the app's stdout and stderr, through the guest init's virtio console
APP_CONSOLE = "app.sock"  # that console's chardev: the manager reads it into app.log (vmm/console.py)
QEMU_LOG = "qemu.log"  # QEMU's own stderr
AGENT_SOCKET = "agent.sock"  # the guest agent's channel (disk images)
# QEMU's own seccomp filter, every deny option on (a jailed QEMU has dropped its privileges already).
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

@dataclass(frozen=True)
class MachineSpec:
    """Everything that must be identical between a boot and every restore of its snapshot."""

    name: str
    kernel: Path
    initrd: Path
    cmdline: str
    memory_mb: int
    vcpus: int
    accel: Accelerator
    has_disk: bool = False  # a root disk (virtio-blk), an app log console and the guest agent channel


@dataclass(frozen=True)
class DiskBacking:
    """The root disk: the template's raw base while it boots, a VM's qcow2 overlay afterwards."""

    path: Path
    format: str  # raw | qcow2


@dataclass(frozen=True)
class RamBacking:
    """Where guest RAM lives. share=True writes go to the file; False maps it copy-on-write."""

    path: Path
    share: bool


def build_argv(
    qemu_binary: str,
    spec: MachineSpec,
    ram: RamBacking,
    disk: DiskBacking | None,
    run_dir: Path,
    incoming: bool,
    console_socket: bool = False,
    tap_fd: int | None = None,
    sandbox: bool = False,
) -> list[str]:
    """The QEMU command line, run inside the VM's network namespace via `ip netns exec`.

    `run_dir` holds the QMP socket, the console log (serial.log) and the app's log (app.log).
    With `console_socket` the app's console is a socket the manager reads (app.sock, see
    vmm/console.py); else QEMU appends it to app.log itself (a template's boot).
    `tap_fd`: the VM's tap, opened by the manager (a jailed QEMU cannot open /dev/net/tun);
    `sandbox`: QEMU's seccomp filter with every deny option.
    The device set must be the same at a boot and at every restore of its snapshot.
    """
    if spec.has_disk != (disk is not None):
        raise VmmError(f"{spec.name}: the machine {'needs' if spec.has_disk else 'has no'} root disk")
    guest_net = f"mvm.ip={netns.GUEST_IP}/{netns.PREFIX} mvm.gw={netns.HOST_IP}"
    append = " ".join([spec.cmdline, *spec.accel.kernel_args, guest_net])
    argv = [
        qemu_binary,
        "-name", spec.name,
        "-machine", "microvm,memory-backend=mem",
        *spec.accel.qemu_args,
        "-m", f"{spec.memory_mb}M",
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", append,
        "-object",
        f"memory-backend-file,id=mem,size={spec.memory_mb}M,mem-path={ram.path},share={'on' if ram.share else 'off'}",
        # append=on: a restore must not truncate the log of the boot it continues.
        "-chardev", f"file,id=ser0,path={run_dir / SERIAL_LOG},append=on",
        "-serial", "chardev:ser0",
        "-netdev", (f"tap,id=n0,fd={tap_fd}" if tap_fd is not None
                    else f"tap,id=n0,ifname={netns.TAP},script=no,downscript=no"),
        "-device", f"virtio-net-device,netdev=n0,mac={netns.GUEST_MAC}",
        "-qmp", f"unix:{run_dir / QMP_SOCKET},server=on,wait=off",
    ]  # fmt: skip
    if disk is not None:
        argv += [
            "-drive", f"file={disk.path},format={disk.format},if=none,id=disk0,discard=unmap,detect-zeroes=unmap",
            "-device", "virtio-blk-device,drive=disk0",
            "-device", "virtio-serial-device",
            "-chardev", (f"socket,id=applog,path={run_dir / APP_CONSOLE},server=on,wait=off" if console_socket
                         else f"file,id=applog,path={run_dir / APP_LOG},append=on"),
            "-device", "virtconsole,chardev=applog",
            # The guest agent's channel (guest/init/agent.c): only the host reaches this socket.
            "-chardev", f"socket,id=agent,path={run_dir / AGENT_SOCKET},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=mvm.agent",
        ]  # fmt: skip
    if incoming:
        argv += ["-incoming", "defer"]
    if sandbox:
        argv += ["-sandbox", SANDBOX]
    return argv


class QemuProcess:
    """A running QEMU, spawned here or re-adopted after a manager restart."""

    def __init__(self, pid: int, on_exit: Callable[[QemuProcess, int | None], None] | None = None) -> None:
        self.pid = pid
        self.start_ticks = start_ticks(pid)
        self.exit_status: int | None = None
        self.exited = asyncio.Event()
        self._on_exit = on_exit
        self._pidfd = os.pidfd_open(pid)
        asyncio.get_running_loop().add_reader(self._pidfd, self._reap)

    @classmethod
    def spawn(
        cls,
        argv: list[str],
        vm_id: str,
        log_path: Path,
        on_exit: Callable[[QemuProcess, int | None], None] | None = None,
        confinement: tuple[Confinement, Path] | None = None,
    ) -> QemuProcess:
        """Start QEMU in the VM's namespace, in a new session, stderr to the VM's log.

        With a `confinement` and its helper (vmm/jail.py) the helper enters the namespace, the
        cgroups and the jail before it execs QEMU; without, `ip netns exec` runs QEMU as this user.
        """
        if confinement is not None:
            return cls._spawn_confined(argv, log_path, on_exit, *confinement)
        ip = shutil.which("ip") or "/usr/sbin/ip"
        full = [ip, "netns", "exec", netns.ns_name(vm_id), *argv]
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            pid = os.posix_spawn(
                ip,
                full,
                os.environ,
                setsid=True,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, fd, 1),
                    (os.POSIX_SPAWN_DUP2, fd, 2),
                ],
            )
        finally:
            os.close(fd)
        return cls(pid, on_exit)

    @classmethod
    def _spawn_confined(
        cls,
        argv: list[str],
        log_path: Path,
        on_exit: Callable[[QemuProcess, int | None], None] | None,
        confinement: Confinement,
        helper: Path,
    ) -> QemuProcess:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for kept in confinement.keep_fds:
                os.set_inheritable(kept, True)  # the helper closes every other descriptor before QEMU starts
            pid = os.posix_spawn(
                str(helper),
                confinement.argv(helper, argv),
                {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
                setsid=True,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, fd, 1),
                    (os.POSIX_SPAWN_DUP2, fd, 2),
                ],
            )
        except OSError as exc:
            raise VmmError(f"could not start QEMU in its jail: {exc}") from exc
        finally:
            os.close(fd)
            for kept in confinement.keep_fds:
                os.set_inheritable(kept, False)
        return cls(pid, on_exit)

    @classmethod
    def adopt(
        cls, pid: int, vm_name: str, on_exit: Callable[[QemuProcess, int | None], None] | None = None
    ) -> QemuProcess | None:
        """Re-attach to a QEMU left running by an earlier manager, if it is really ours."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            proc = cls(pid, on_exit)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None
        if vm_name.encode() not in cmdline or not any(b"qemu-system" in arg for arg in cmdline):
            proc.close()
            return None
        return proc

    def _reap(self) -> None:
        status: int | None = None
        with contextlib.suppress(ChildProcessError):
            _, raw = os.waitpid(self.pid, os.WNOHANG)
            status = os.waitstatus_to_exitcode(raw)
        self.exit_status = status
        self.close()
        self.exited.set()
        if self._on_exit is not None:
            self._on_exit(self, status)

    def close(self) -> None:
        if self._pidfd >= 0:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    async def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL and wait for the exit; guest RAM in a shared file is already on disk."""
        if not self.alive:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        try:
            async with asyncio.timeout(timeout):
                await self.exited.wait()
        except TimeoutError as exc:
            raise VmmError(f"QEMU pid {self.pid} did not exit after SIGKILL") from exc


def start_ticks(pid: int) -> int:
    """When the process started (clock ticks since boot): a pid with another start time is another process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return int(stat.rpartition(")")[2].split()[19])


def qemus_by_name() -> dict[str, list[int]]:
    """Every running QEMU by its `-name`, whoever started it and whatever it is for."""
    found: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not any(b"qemu-system" in arg for arg in argv) or b"-name" not in argv:
            continue
        name_at = argv.index(b"-name") + 1
        if name_at < len(argv):
            found.setdefault(argv[name_at].decode(errors="replace"), []).append(int(entry.name))
    return found


async def kill_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGKILL a QEMU nothing tracks (an orphan found after a restart) and wait for its end."""
    try:
        proc = QemuProcess(pid)
    except ProcessLookupError:
        return
    try:
        await proc.kill(timeout)
    finally:
        proc.close()


def describe_exit(status: int | None) -> str:
    if status is None:
        return "QEMU exited"
    if status < 0:
        return f"QEMU was killed by signal {signal.Signals(-status).name}"
    return f"QEMU exited with status {status}"
