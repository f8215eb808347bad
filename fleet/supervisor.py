"""The supervisor of `mvm serve` and `mvm edge`: it starts the child processes, watches each, stops them in order.

- The host (`mvm serve` only) starts first. The edge workers start once it says, on a pipe of
  its own, that it is ready: never whoever answers its address, which may be an older host.
- Edge workers hold no state: one that dies is started again after a backoff (0.5 s doubling
  up to 30 s, back to 0.5 s once it had run for a minute), and each restart is logged with
  the worker, its exit status and a running count.
- A host that dies stops the whole set with a non-zero status: its VMs need a manager, and
  whatever runs `mvm serve` (systemd) starts it again; the new host re-adopts the running VMs.
- A child that fails to start (it dies or is not ready in time) stops the set: a bad config
  fails fast instead of restarting forever.
- On SIGTERM or SIGINT the edges stop first and drain (server.drain_timeout, plus a margin
  before they are killed); the host stops last, so its on_shutdown step (suspend) runs after
  the last request in flight got its answer.
Children run in process groups of their own (a terminal's Ctrl-C reaches the supervisor only,
which stops them in that order) and get SIGTERM if the supervisor itself dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmm.jsonlog import log

from .privilege import Identity
from .run_dir import RunDir, worker_nofile
from .settings import ClusterConfig
from .tls_mirror import TlsMirror

EVERY = 0.2  # seconds between looks at the children
DRAIN_MARGIN = 5.0  # seconds past server.drain_timeout before a stopping edge worker is killed
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a child between fork and exec only calls it


class Proc(Protocol):
    """What the supervisor needs of a child process (subprocess in production, a fake in tests)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def ready(self) -> bool: ...

    def send_signal(self, sig: int) -> None: ...


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass
class Backoff:
    """Waits between the restarts of one worker: `first`, doubling up to `cap`, and `first` again
    after a run of at least `stable_after` seconds (a worker that crashes once a day is not penalised)."""

    first: float = 0.5
    cap: float = 30.0
    stable_after: float = 60.0
    _next: float = field(default=0.0, init=False)

    def after_run(self, ran_for: float) -> float:
        """The wait before starting again a worker that ended after running `ran_for` seconds."""
        if ran_for >= self.stable_after or self._next == 0.0:
            self._next = self.first
        delay = self._next
        self._next = min(self.cap, delay * 2)
        return delay


@dataclass
class Child:
    """One supervised role: its command and, while it runs, its process."""

    name: str
    command: list[str]
    pass_fds: tuple[int, ...] = ()
    proc: Proc | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # dead: to be started again at this time
    status: int | None = None  # the last exit status
    restarts: int = 0
    backoff: Backoff = field(default_factory=Backoff)


Spawn = Callable[[Child], Proc]


class Supervisor:
    """The policy above over any processes (`spawn`) and time (`clock`): tests drive it with fakes."""

    def __init__(
        self, spawn: Spawn, clock: Clock, ready_wait: float, drain_wait: float, every: float = EVERY,
        on_exit: Callable[[int], None] = lambda pid: None, on_tick: Callable[[], None] = lambda: None,
    ) -> None:  # fmt: skip
        self.spawn, self.clock = spawn, clock
        self.ready_wait, self.drain_wait, self.every = ready_wait, drain_wait, every
        self.on_exit = on_exit  # told each ended child's pid once (the set's shared files forget it)
        self.on_tick = on_tick  # called at every look while the set runs (the TLS mirror's refresh)
        self.stopping = False
        self._reported: set[int] = set()

    def request_stop(self, signum: int = signal.SIGTERM, _frame: Any = None) -> None:
        """SIGTERM or SIGINT: stop the set in order (called from the signal handler)."""
        self.stopping = True

    def run(self, host: Child | None, workers: list[Child]) -> int:
        """The set from its start to the end of its last child; returns its exit status.

        Whatever happens (a child that cannot even be spawned too), every child started is
        stopped before this returns: edges first, then the host.
        """
        try:
            status = self._start([host], []) if host is not None else None
            if status is None:
                status = self._start(workers, [host] if host is not None else [])
            if status is None:
                status = self._watch(host, workers)
        finally:
            self._stop(workers, self.drain_wait)
            if host is not None:
                self._stop([host], None)
            for child in [*workers, *([host] if host is not None else [])]:
                if _ended(child):
                    self._report(child)
        if status == 0 and host is not None:
            status = _exit_status(host.status)
        return status

    def _start(self, children: list[Child], running: list[Child]) -> int | None:
        """Start `children` and wait until each says it is ready; None once they all are, else the
        set's exit status (a child died, did not get ready in time, or a stop was asked for)."""
        for child in children:
            self._spawn(child)
        deadline = self.clock.monotonic() + self.ready_wait
        while not all(_ready(child) for child in children):
            if self.stopping:
                return 0
            for child in children + running:
                if _ended(child):
                    log.event("fleet.child_failed", level="error", child=child.name, **_described(child.status))
                    return _exit_status(child.status) or 1
            if self.clock.monotonic() > deadline:
                waiting = [child.name for child in children if not _ready(child)]
                log.event("fleet.not_ready", level="error", children=waiting, waited=self.ready_wait)
                return 1
            self.clock.sleep(self.every)
        return None

    def _watch(self, host: Child | None, workers: list[Child]) -> int:
        """Until a stop is asked for (0) or the host dies (its status): restart the workers that die."""
        while not self.stopping:
            now = self.clock.monotonic()
            if host is not None and _ended(host):
                log.event("fleet.host_exited", level="error", pid=_pid(host), **_described(host.status),
                          action="stopping every worker")  # fmt: skip
                return _exit_status(host.status) or 1
            for worker in workers:
                if worker.restart_at is None and _ended(worker):
                    self._report(worker)
                    delay = worker.backoff.after_run(now - worker.started_at)
                    worker.restart_at = now + delay
                    log.event("fleet.worker_exited", level="error", worker=worker.name, pid=_pid(worker),
                              **_described(worker.status), restart_in=delay)  # fmt: skip
                elif worker.restart_at is not None and now >= worker.restart_at:
                    previous = _pid(worker)
                    self._spawn(worker)
                    worker.restarts += 1
                    log.event("fleet.worker_restarted", level="warning", worker=worker.name, pid=_pid(worker),
                              previous_pid=previous, **_described(worker.status), restarts=worker.restarts)  # fmt: skip
            self.on_tick()
            self.clock.sleep(self.every)
        return 0

    def _stop(self, children: list[Child], wait: float | None) -> None:
        """SIGTERM each live child and wait for them all; after `wait` seconds (None: no bound) SIGKILL."""
        live = [child for child in children if child.proc is not None and not _ended(child)]
        if live:
            log.event("fleet.stopping", children=[child.name for child in live], wait=wait)
        for child in children:
            child.restart_at = None
        for child in live:
            assert child.proc is not None
            child.proc.send_signal(signal.SIGTERM)
        deadline = None if wait is None else self.clock.monotonic() + wait
        killed = False
        while not all(child.proc is None or _ended(child) for child in children):
            if deadline is not None and not killed and self.clock.monotonic() > deadline:
                left = [child for child in children if child.proc is not None and not _ended(child)]
                log.event("fleet.kill", level="warning", children=[child.name for child in left], waited=wait)
                for child in left:
                    assert child.proc is not None
                    child.proc.send_signal(signal.SIGKILL)
                killed = True
            self.clock.sleep(self.every)

    def _report(self, child: Child) -> None:
        pid = _pid(child)
        if pid is not None and pid not in self._reported:
            self._reported.add(pid)
            self.on_exit(pid)

    def _spawn(self, child: Child) -> None:
        child.proc = self.spawn(child)
        child.started_at = self.clock.monotonic()
        child.restart_at = None
        log.event("fleet.child_started", child=child.name, pid=child.proc.pid)


def _ended(child: Child) -> bool:
    """Whether the child's process has ended (reaping it: no zombie is left behind)."""
    if child.proc is None:
        return False
    status = child.proc.poll()
    if status is not None:
        child.status = status
    return status is not None


def _ready(child: Child) -> bool:
    return child.proc is not None and child.proc.ready()


def _pid(child: Child) -> int | None:
    return child.proc.pid if child.proc is not None else None


def _described(status: int | None) -> dict[str, Any]:
    """An exit status for the log: the code, and the signal's name when it was killed."""
    if status is None or status >= 0:
        return {"status": status}
    try:
        name = signal.Signals(-status).name
    except ValueError:
        name = str(-status)
    return {"status": status, "signal": name}


def _exit_status(status: int | None) -> int:
    """A child's status as a process exit status (a signal: 128 + its number, as a shell reports it)."""
    if status is None:
        return 1
    return 128 - status if status < 0 else status


# ---- production: real child processes ------------------------------------------------------


class ChildProcess:
    """A child started with `--ready-fd N`: the write end of a pipe on which it says it is ready."""

    def __init__(self, command: list[str], pass_fds: tuple[int, ...] = (), env: dict[str, str] | None = None) -> None:
        read_end, write_end = os.pipe()
        try:
            self.popen = subprocess.Popen(
                [*command, "--ready-fd", str(write_end)], pass_fds=(write_end, *pass_fds), stdin=subprocess.DEVNULL,
                env=env,
                process_group=0, preexec_fn=functools.partial(_end_with_parent, os.getpid()),
            )  # fmt: skip
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # the child holds it now: EOF on our end when it dies
        os.set_blocking(read_end, False)
        self._ready_fd: int | None = read_end
        self._ready = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        status = self.popen.poll()
        if status is not None and self._ready_fd is not None:
            self.ready()  # what it said before it ended still counts; the pipe is closed either way
        return status

    def ready(self) -> bool:
        if self._ready_fd is not None:
            try:
                said = os.read(self._ready_fd, 64)
            except BlockingIOError:
                if self.popen.poll() is None:
                    return False
                said = b""  # ended without a word: never ready
            self._ready = bool(said)
            os.close(self._ready_fd)
            self._ready_fd = None
        return self._ready

    def send_signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)


def _end_with_parent(supervisor: int) -> None:
    """In the child before exec: SIGTERM when the supervisor dies, so no child outlives it."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before the line above
        os._exit(1)


def supervise(
    host: Child | None,
    workers: list[Child],
    ready_wait: float,
    drain_wait: float,
    nofile: int,
    worker: Identity | None = None,
    cluster: ClusterConfig | None = None,
) -> int:
    """Run the set as real processes until SIGTERM or SIGINT (or its host dies); the exit status.

    The set's run directory (fleet.run_dir: the per-IP table and the metrics files its processes
    share) is made before the first child starts and removed once the last one has ended.
    `cluster`: with mutual TLS on and workers that give up root, its edge files are kept copied
    there for them (fleet.tls_mirror), so a rotation reaches them.
    """
    run = RunDir.create(len(workers), worker_nofile(nofile), worker=worker)
    env = run.env()
    mirror = TlsMirror(cluster, run.path, worker) if cluster is not None and cluster.tls and worker else None
    supervisor = Supervisor(lambda child: ChildProcess(child.command, child.pass_fds, env), SystemClock(),
                            ready_wait, drain_wait, on_exit=run.forget,
                            on_tick=mirror.refresh if mirror is not None else lambda: None)  # fmt: skip
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    try:
        return supervisor.run(host, workers)
    finally:
        run.remove()


def announce_ready(fd: int | None) -> None:
    """A supervised child serves now: say so on its `--ready-fd` (nothing when run by hand)."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(fd, b"ready\n")
        os.close(fd)
