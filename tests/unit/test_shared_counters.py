"""What the processes of one `mvm serve` set share: the per-IP connection table and the metrics.

Members are real subprocesses (`tests.unit.set_member`) driven line by line: every command
is answered before the next is sent, so no sleep stands in for synchronisation.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge.shared_ips import SharedIpTable, slots_for
from fleet.run_dir import RunDir
from tests.unit.proxy_harness import VM, FakeBackend, Upstream, start_edge

ROOT = Path(__file__).resolve().parents[2]


class Member:
    """One process of the set."""

    def __init__(self, run: RunDir) -> None:
        env = run.env() | {"PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.unit.set_member"], cwd=ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.hello = self._answer()

    def _answer(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"member {self.proc.pid} ended: {self.proc.wait()}"
        return orjson.loads(line)

    def __call__(self, *command: object) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(str(c) for c in command) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = self("render")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


@pytest.fixture
def run(tmp_path: Path) -> Iterator[RunDir]:
    run = RunDir.create(workers=2, max_connections=100, base=tmp_path)
    yield run
    run.remove()


@pytest.fixture
def members(run: RunDir) -> Iterator[list[Member]]:
    started: list[Member] = []
    yield started
    for member in started:
        if member.proc.poll() is None:
            member.kill()
        for pipe in (member.proc.stdin, member.proc.stdout):
            if pipe is not None:
                pipe.close()


def _join(run: RunDir, members: list[Member]) -> Member:
    member = Member(run)
    members.append(member)
    return member


def test_the_limit_holds_across_worker_processes(run: RunDir, members: list[Member]) -> None:
    a, b = _join(run, members), _join(run, members)
    assert a.hello == b.hello == {"joined": True, "shared_metrics": True}
    assert [a("open", "10.1.1.1", 5) for _ in range(3)] == [True] * 3
    assert [b("open", "10.1.1.1", 5) for _ in range(2)] == [True] * 2
    assert a("open", "10.1.1.1", 5) is False and b("open", "10.1.1.1", 5) is False, "5 held over two workers"
    assert b("open", "10.2.2.2", 5) is True, "another address has its own count"
    assert run.table.total(b"10.1.1.1") == 5
    a("close", "10.1.1.1")
    assert b("open", "10.1.1.1", 5) is True and a("open", "10.1.1.1", 5) is False


def test_a_killed_worker_leaves_no_count_behind(run: RunDir, members: list[Member]) -> None:
    a, b = _join(run, members), _join(run, members)
    for _ in range(4):
        assert a("open", "10.1.1.1", 5) is True
    assert b("open", "10.1.1.1", 5) is True and b("open", "10.1.1.1", 5) is False
    a.kill()  # no cleanup of its own: kill -9
    assert run.table.total(b"10.1.1.1") == 5, "the dead worker's region is still there"
    run.forget(a.proc.pid)  # what the supervisor does when it reaps the child
    assert run.table.total(b"10.1.1.1") == 1
    assert [b("open", "10.1.1.1", 5) for _ in range(5)] == [True, True, True, True, False]


def test_the_next_worker_reaps_a_dead_one_it_replaces(run: RunDir, members: list[Member]) -> None:
    a, b = _join(run, members), _join(run, members)
    assert _join(run, members).hello["joined"] is False, "two regions, both owned by live workers"
    for _ in range(3):
        assert a("open", "10.1.1.1", 3) is True
    assert b("open", "10.1.1.1", 3) is False
    a.kill()
    c = _join(run, members)  # a restarted worker, with nobody having cleaned up for a
    assert c.hello["joined"] is True
    assert run.table.total(b"10.1.1.1") == 0
    assert [c("open", "10.1.1.1", 3), b("open", "10.1.1.1", 3), b("open", "10.1.1.1", 3)] == [True] * 3
    assert c("open", "10.1.1.1", 3) is False


def test_metrics_on_any_process_are_the_whole_sets(run: RunDir, members: list[Member]) -> None:
    host, w1, w2 = _join(run, members), _join(run, members), _join(run, members)
    for allowed in (1, 1, 0):
        host("count", "egress", allowed)  # the host process counts its guests' egress
    w1("count", "request", 200)
    w1("count", "client_connections", 1)
    w1("count", "held", 1)
    w1("count", "proxied", 100, 1000)
    w2("count", "request", 200)
    w2("count", "request", 502)
    w2("count", "client_connections", 1)
    w2("count", "connection_refused", "per_ip")
    w2("count", "wake", 1, 1)
    for answering in (w1, w2, host):
        seen = answering.metrics()
        assert seen[("mvm_egress_attempts_total", (("decision", "allowed"),))] == 2
        assert seen[("mvm_egress_attempts_total", (("decision", "denied"),))] == 1
        assert seen[("mvm_requests_total", (("status", "200"),))] == 2
        assert seen[("mvm_requests_total", (("status", "502"),))] == 1
        assert seen[("mvm_client_connections", ())] == 2
        assert seen[("mvm_held_requests", ())] == 1
        assert seen[("mvm_proxied_bytes_total", (("direction", "down"),))] == 1000
        assert seen[("mvm_connections_refused_total", (("reason", "per_ip"),))] == 1
        assert seen[("mvm_wakes_total", (("result", "ok"),))] == 1
        assert seen[("mvm_wake_seconds_count", ())] == 1
        assert seen[("mvm_vms", (("state", "running"),))] == 1, "VM states: the answering process's view, not a sum"
    w1.kill()
    run.forget(w1.proc.pid)
    seen = w2.metrics()
    assert seen[("mvm_client_connections", ())] == 1 and seen[("mvm_held_requests", ())] == 0, "live gauges"
    assert seen[("mvm_requests_total", (("status", "200"),))] == 2, "counters keep what the dead process counted"


def test_a_lone_process_keeps_plain_metrics() -> None:
    from edge.metrics import Metrics

    one, two = Metrics(), Metrics()
    one.request(200)
    assert one.shared is None
    assert one.registry.get_sample_value("mvm_requests_total", {"status": "200"}) == 1
    assert two.registry.get_sample_value("mvm_requests_total", {"status": "200"}) is None


def test_the_table_matches_a_dict_under_random_opens_and_closes(tmp_path: Path) -> None:
    """Addresses come and go: zero entries are reused, the region is rebuilt, counts stay exact."""
    table = SharedIpTable.create(tmp_path / "t", regions=2, slots=slots_for(0))
    other = SharedIpTable(tmp_path / "t")
    try:
        assert table.claim(os.getpid()) and other.claim(os.getpid()) and table.mine != other.mine
        rng = random.Random(13)
        clients = [f"10.0.{i // 256}.{i % 256}".encode() for i in range(5000)]
        mine: dict[bytes, int] = {}
        for step in range(40_000):
            if step % 10 == 0 and step:  # the window of 300 addresses slides on: one leaves for good
                gone = clients[step // 10 - 1]
                while mine.get(gone):
                    mine[gone] -= 1
                    table.closed(gone, mine[gone])
            client = clients[step // 10 + rng.randrange(300)]
            n = mine.get(client, 0)
            if n and rng.random() < 0.6:
                mine[client] = n - 1
                table.closed(client, n - 1)
            else:
                assert table.opened(client, n, 1_000_000, lambda _: False)
                mine[client] = n + 1
        assert table._used < len(mine), "the region was rebuilt: zero entries do not pile up"
        assert all(other.total(c) == mine.get(c, 0) for c in clients)
        busy = max(mine, key=lambda c: mine[c])
        assert other.opened(busy, 0, mine[busy], lambda _: False) is False
        assert other.opened(busy, 0, mine[busy] + 1, lambda _: False) is True
        other.closed(busy, 0)
        for client in mine:
            table.closed(client, 0)
        assert all(table.total(c) == 0 for c in clients)
    finally:
        table.close()
        other.close()


async def test_two_edges_sharing_a_table_refuse_past_the_limit_wherever_it_lands(
    upstream: Upstream, tmp_path: Path
) -> None:
    """The accept path itself (`ProxyContext.client_opened`), one table file, two listeners."""
    SharedIpTable.create(tmp_path / "t", regions=2, slots=slots_for(0)).close()
    edges = []
    for _ in range(2):
        backend = FakeBackend()
        backend.add_vm(VM, upstream.port)
        edge = await start_edge(backend, max_connections_per_ip=3)
        edge.ctx.shared_ips = SharedIpTable(tmp_path / "t")
        assert edge.ctx.shared_ips.claim(os.getpid())
        edges.append(edge)
    first, second = edges
    try:
        kept = [await first.connect(), await first.connect(), await second.connect()]
        for c, edge in zip(kept, (first, first, second), strict=True):  # each one counted before the next
            assert (await c.get("/echo", edge.host(), {"Authorization": f"Bearer {edge.token()}"})).status == 200
        for edge in edges:
            extra = await edge.connect()
            assert (await extra.response()).status == 429
            assert await extra.closed()
        kept[0].close()
        async with asyncio.timeout(5):
            while first.ctx.per_ip != {b"127.0.0.1": 1}:
                await asyncio.sleep(0.01)
        again = await second.connect()
        assert (await again.get("/echo", second.host(), {"Authorization": f"Bearer {second.token()}"})).status == 200
        assert second.ctx.shared_ips is not None and second.ctx.shared_ips.total(b"127.0.0.1") == 3
        for c in [*kept[1:], again]:
            c.close()
    finally:
        for edge in edges:
            await edge.close()
            assert edge.ctx.shared_ips is not None
            edge.ctx.shared_ips.close()


async def test_a_worker_batches_its_hot_counts_until_a_flush_or_a_scrape() -> None:
    from edge.metrics import Metrics

    metrics = Metrics()
    metrics.flush_every(3600)
    try:
        metrics.request(200)
        metrics.proxied(10, 20)
        metrics.client_connections(1)
        assert metrics.registry.get_sample_value("mvm_requests_total", {"status": "200"}) is None, "batched"
        text = metrics.render()[0].decode()  # a scrape writes the batch first
        assert 'mvm_requests_total{status="200"} 1.0' in text and "mvm_client_connections 1.0" in text
        metrics.request(404)
    finally:
        metrics.stop_flushing()
    assert metrics.registry.get_sample_value("mvm_requests_total", {"status": "404"}) == 1, "written when it stops"
    assert metrics.registry.get_sample_value("mvm_proxied_bytes_total", {"direction": "down"}) == 20
    metrics.request(404)
    assert metrics.registry.get_sample_value("mvm_requests_total", {"status": "404"}) == 2, "direct again"


def test_a_new_set_removes_the_directory_of_a_killed_supervisor(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"mvm-set-{gone.stdout.strip()}-abc"
    (orphan / "metrics").mkdir(parents=True)
    alive = tmp_path / f"mvm-set-{os.getpid()}-def"
    alive.mkdir()
    run = RunDir.create(workers=1, max_connections=10, base=tmp_path)
    try:
        assert not orphan.exists() and alive.exists() and run.path.is_dir()
    finally:
        run.remove()
    assert not run.path.exists()
