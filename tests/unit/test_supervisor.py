"""The supervisor of `mvm serve` with fake processes and a fake clock: restarts with backoff,
a dead host stopping the set, the stop order (edges drained before the host), and start-up failures.
No test sleeps: the clock jumps when the supervisor sleeps, and scripted events fire at set times.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from fleet.supervisor import Backoff, Child, ChildProcess, Proc, Supervisor
from vmm import jsonlog, statelock
from vmm.errors import Conflict, VmmError


class FakeClock:
    """Time moves only when the supervisor sleeps; `at(t, action)` runs `action` once time reaches t."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept = 0
        self._events: list[tuple[float, Callable[[], None]]] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept += 1
        assert self.slept < 100_000, "the supervisor never ended"
        self.now += seconds
        for event in [e for e in self._events if e[0] <= self.now]:
            self._events.remove(event)
            event[1]()

    def at(self, when: float, action: Callable[[], None]) -> None:
        self._events.append((when, action))


class FakeProc:
    """A child: ready from `ready_at`, ends on SIGTERM (unless stubborn) and on SIGKILL."""

    def __init__(self, pid: int, clock: FakeClock, ready_at: float, stubborn: bool, journal: list[str]) -> None:
        self.pid, self.clock, self.ready_at, self.stubborn, self.journal = pid, clock, ready_at, stubborn, journal
        self.status: int | None = None

    def poll(self) -> int | None:
        return self.status

    def ready(self) -> bool:
        return self.status is None and self.clock.now >= self.ready_at

    def send_signal(self, sig: int) -> None:
        self.journal.append(f"{signal.Signals(sig).name} {self.pid}")
        if sig == signal.SIGKILL or not self.stubborn:
            self.status = -sig if sig == signal.SIGKILL else 0

    def die(self, status: int = -signal.SIGKILL) -> None:
        self.status = status


class Fleet:
    """A supervisor over fake processes: one host and two edge workers unless told otherwise."""

    def __init__(self, host: bool = True, workers: int = 2, ready_after: dict[str, float] | None = None) -> None:
        self.clock = FakeClock()
        self.journal: list[str] = []
        self.procs: dict[int, FakeProc] = {}
        self.names: dict[int, str] = {}
        self.ready_after = ready_after or {}
        self.stubborn: set[str] = set()
        self.supervisor = Supervisor(self._spawn, self.clock, ready_wait=30.0, drain_wait=15.0)
        self.host = Child("host", ["host"]) if host else None
        self.workers = [Child(f"edge-{i}", ["edge"]) for i in range(workers)]

    def _spawn(self, child: Child) -> FakeProc:
        pid = 100 + len(self.procs)
        ready_at = self.clock.now + self.ready_after.get(child.name, 0.0)
        proc = FakeProc(pid, self.clock, ready_at, child.name in self.stubborn, self.journal)
        self.procs[pid], self.names[pid] = proc, child.name
        self.journal.append(f"start {child.name} {pid}")
        return proc

    def pids(self, name: str) -> list[int]:
        return [pid for pid, n in self.names.items() if n == name]

    def current(self, name: str) -> FakeProc:
        return self.procs[self.pids(name)[-1]]

    def run(self) -> int:
        return self.supervisor.run(self.host, self.workers)


def logged(out: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    out = io.StringIO()
    jsonlog.configure("info", out)
    try:
        yield out
    finally:
        jsonlog.configure("info", None)


def test_backoff_doubles_to_its_cap_and_starts_over_after_a_long_run() -> None:
    backoff = Backoff(first=0.5, cap=4.0, stable_after=60.0)
    assert [backoff.after_run(1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.after_run(60.0) == 0.5, "a worker that ran a while is restarted quickly again"
    assert backoff.after_run(0.1) == 1.0


def test_a_killed_worker_is_restarted_with_backoff_and_each_restart_is_logged(log_lines: io.StringIO) -> None:
    fleet = Fleet()

    def kill_edge_1() -> None:
        fleet.current("edge-1").die()

    for when in (10.0, 11.0, 13.0):  # soon after each restart: waits of 0.5 s, then 1 s, then 2 s
        fleet.clock.at(when, kill_edge_1)
    fleet.clock.at(100.0, kill_edge_1)  # after a long run: 0.5 s again
    fleet.clock.at(120.0, fleet.supervisor.request_stop)
    assert fleet.run() == 0
    assert len(fleet.pids("edge-1")) == 5 and len(fleet.pids("edge-0")) == 1 and len(fleet.pids("host")) == 1
    restarts = [e for e in logged(log_lines) if e["event"] == "fleet.worker_restarted"]
    assert [(e["worker"], e["status"], e["signal"], e["restarts"]) for e in restarts] == [
        ("edge-1", -9, "SIGKILL", n) for n in (1, 2, 3, 4)
    ]
    assert [e["pid"] for e in restarts] == fleet.pids("edge-1")[1:]
    exits = [e for e in logged(log_lines) if e["event"] == "fleet.worker_exited"]
    assert [e["restart_in"] for e in exits] == [0.5, 1.0, 2.0, 0.5]


def test_a_dead_host_stops_every_worker_and_the_set_exits_non_zero(log_lines: io.StringIO) -> None:
    fleet = Fleet()
    fleet.clock.at(5.0, lambda: fleet.current("host").die())
    status = fleet.run()
    assert status == 128 + signal.SIGKILL
    assert all(proc.status is not None for proc in fleet.procs.values()), "no child is left running"
    assert len(fleet.procs) == 3, "nothing was restarted"
    assert next(e for e in logged(log_lines) if e["event"] == "fleet.host_exited")["signal"] == "SIGKILL"


def test_a_stop_drains_the_edges_first_then_stops_the_host() -> None:
    fleet = Fleet()
    fleet.stubborn.add("edge-0")  # does not end within the drain: killed after drain_wait
    fleet.clock.at(3.0, fleet.supervisor.request_stop)
    assert fleet.run() == 0
    host, edge0, edge1 = fleet.pids("host")[0], fleet.pids("edge-0")[0], fleet.pids("edge-1")[0]
    stops = [line for line in fleet.journal if not line.startswith("start")]
    assert stops == [f"SIGTERM {edge0}", f"SIGTERM {edge1}", f"SIGKILL {edge0}", f"SIGTERM {host}"]
    assert fleet.clock.now >= 3.0 + 15.0, "the stubborn edge had its whole drain before it was killed"


def test_edges_start_only_once_their_own_host_is_ready() -> None:
    fleet = Fleet(ready_after={"host": 7.0})
    fleet.clock.at(6.9, lambda: fleet.journal.append("checkpoint"))
    fleet.clock.at(20.0, fleet.supervisor.request_stop)
    assert fleet.run() == 0
    assert fleet.journal.index("checkpoint") < fleet.journal.index(f"start edge-0 {fleet.pids('edge-0')[0]}")


def test_a_host_that_dies_or_never_gets_ready_stops_the_set_before_any_edge_starts() -> None:
    dying = Fleet(ready_after={"host": 10.0})
    dying.clock.at(2.0, lambda: dying.current("host").die(1))
    assert dying.run() == 1
    assert dying.pids("edge-0") == []
    late = Fleet(ready_after={"host": 1000.0})
    assert late.run() == 1
    assert late.pids("edge-0") == [] and late.current("host").status == 0, "the host was stopped"


def test_a_worker_that_fails_at_its_first_start_stops_the_set() -> None:
    fleet = Fleet(ready_after={"edge-1": 5.0})
    fleet.clock.at(1.0, lambda: fleet.current("edge-1").die(1))
    assert fleet.run() == 1
    assert len(fleet.pids("edge-1")) == 1, "a bad config is not restarted forever"
    assert all(proc.status is not None for proc in fleet.procs.values())


def test_edges_alone_restart_and_stop_without_a_host() -> None:
    fleet = Fleet(host=False)
    fleet.clock.at(2.0, lambda: fleet.current("edge-0").die(-signal.SIGSEGV))
    fleet.clock.at(5.0, fleet.supervisor.request_stop)
    assert fleet.run() == 0
    assert len(fleet.pids("edge-0")) == 2


def test_the_state_lock_names_its_holder_and_is_adopted_only_as_that_file(tmp_path: Path) -> None:
    fd = statelock.take(tmp_path / "var")
    try:
        with pytest.raises(Conflict, match=rf"state directory {tmp_path}/var is in use by pid {os.getpid()}"):
            statelock.take(tmp_path / "var")
        assert statelock.adopt(tmp_path / "var", fd) == fd, "a descriptor of the lock itself is adopted"
        other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)
        try:
            with pytest.raises(VmmError, match="is not the lock of state directory"):
                statelock.adopt(tmp_path / "var", other)
        finally:
            os.close(other)
    finally:
        os.close(fd)
    os.close(statelock.take(tmp_path / "var"))  # free again once closed


def test_a_real_child_says_it_is_ready_on_its_pipe() -> None:
    says = "import os, sys; os.write(int(sys.argv[2]), b'ready'); sys.exit(3)"
    child = ChildProcess([sys.executable, "-c", says])
    child.popen.wait(timeout=30)
    assert child.poll() == 3 and child.ready(), "what it said before it ended counts"
    silent = ChildProcess([sys.executable, "-c", "pass"])
    silent.popen.wait(timeout=30)
    assert not silent.ready(), "a child that ends without a word was never ready"


def test_a_worker_that_cannot_be_spawned_leaves_nothing_running() -> None:
    fleet = Fleet()
    spawn = fleet.supervisor.spawn

    def spawn_or_fail(child: Child) -> Proc:
        if child.name == "edge-1":
            raise OSError("out of file descriptors")
        return spawn(child)

    fleet.supervisor.spawn = spawn_or_fail
    with pytest.raises(OSError, match="out of file descriptors"):
        fleet.run()
    assert [proc.status for proc in fleet.procs.values()] == [0, 0], "the host and edge-0 were stopped"
