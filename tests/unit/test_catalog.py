"""One catalog test suite, run against the embedded SQLite catalog and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest

from fleet.catalog import Capacity, Catalog, PlacedVm, open_catalog
from fleet.catalog import sqlite as catalog_sqlite
from fleet.catalog.postgres import open_postgres
from tests.pg import PgCluster, create_database, drop_database
from vmm.errors import CatalogError, Conflict, NotFound
from vmm.events import Event
from vmm.model import RamMode, VmRecord, VmState
from vmm.policy import Policy
from vmm.registry import Registry

FEED_WAIT = 5.0  # seconds a notification may take to arrive


class Store:
    """One catalog store (a SQLite file or a PostgreSQL database) that tests open catalogs on."""

    def __init__(self, kind: str, sqlite_path: Path, url: str | None) -> None:
        self.kind = kind
        self.sqlite_path = sqlite_path
        self.url = url
        self.opened: list[Catalog] = []

    async def open(self, upto: int | None = None) -> Catalog:
        """Through open_catalog, as the product opens it, unless a test stops at an older schema."""
        if upto is None:
            cat = await open_catalog(self.url, self.sqlite_path)
        elif self.url is None:
            cat = await catalog_sqlite.open_sqlite(self.sqlite_path, upto=upto)
        else:
            cat = await open_postgres(self.url, upto=upto)
        self.opened.append(cat)
        return cat

    async def close(self, cat: Catalog) -> None:
        self.opened.remove(cat)
        await cat.close()


@asynccontextmanager
async def make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    cluster: PgCluster | None = request.getfixturevalue("pg_cluster") if kind == "postgres" else None
    url = await create_database(cluster) if cluster is not None else None
    store = Store(kind, tmp_path / "catalog.sqlite3", url)
    try:
        yield store
    finally:
        for cat in list(store.opened):
            await cat.close()
        if cluster is not None and url is not None:
            await drop_database(cluster, url)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with make_store(request.param, request, tmp_path) as s:
        yield s


@pytest.fixture
async def pg_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with make_store("postgres", request, tmp_path) as s:
        yield s


def vm(vm_id: str, state: VmState = VmState.RUNNING, created_at: float = 1.0) -> VmRecord:
    return VmRecord(vm_id, "demo", state, Policy(ports=(8081,)), 8080, created_at, created_at + 1)


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll until `condition()` holds, for at most FEED_WAIT seconds."""
    deadline = time.monotonic() + FEED_WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_the_url_chooses_the_backend(store: Store) -> None:
    assert (await store.open()).backend == store.kind


async def test_hosts_heartbeat_and_are_marked_down_when_silent(store: Store) -> None:
    cat = await store.open()
    await cat.heartbeat("h1", "10.0.0.1:7000", Capacity(4096, 4, 10_000), at=100.0)
    await cat.heartbeat("h2", "10.0.0.2:7000", Capacity(2048, 2, 5_000), at=150.0)
    assert [(h.id, h.up, h.heartbeat_at) for h in await cat.hosts()] == [("h1", True, 100.0), ("h2", True, 150.0)]

    assert await cat.mark_down(older_than=120.0) == ["h1"]
    assert await cat.mark_down(older_than=120.0) == []
    assert [(h.id, h.up) for h in await cat.hosts()] == [("h1", False), ("h2", True)]

    await cat.heartbeat("h1", "10.0.0.9:7000", Capacity(1024, 1, 100), at=200.0)
    h1 = (await cat.hosts())[0]
    assert (h1.address, h1.capacity, h1.heartbeat_at, h1.up) == ("10.0.0.9:7000", Capacity(1024, 1, 100), 200.0, True)


async def test_vms_are_created_read_listed_saved_and_deleted(store: Store) -> None:
    cat = await store.open()
    a = vm("va", VmState.RUNNING, created_at=1.0)
    a.ram_mode, a.pid, a.reason = RamMode.OWN_FILE, 4242, "because"
    b, c = vm("vb", VmState.SUSPENDED, created_at=2.0), vm("vc", VmState.SUSPENDED, created_at=3.0)
    await cat.create_vm(a, "h1")
    await cat.create_vm(b, "h1")
    await cat.create_vm(c, "h2")

    assert await cat.get_vm("va") == PlacedVm("h1", a)
    assert await cat.get_vm("nope") is None
    assert [p.rec.id for p in await cat.list_vms()] == ["va", "vb", "vc"]
    assert [p.rec.id for p in await cat.list_vms(host_id="h1")] == ["va", "vb"]
    assert [p.rec.id for p in await cat.list_vms(states=[VmState.SUSPENDED])] == ["vb", "vc"]
    assert [p.rec.id for p in await cat.list_vms(host_id="h2", states=[VmState.RUNNING])] == []
    assert await cat.list_vms(states=[]) == []

    with pytest.raises(Conflict):
        await cat.create_vm(vm("va"), "h2")
    b.state, b.policy, b.last_activity = VmState.RUNNING, Policy(auto_resume=False), 99.0
    await cat.save_vm(b)
    assert await cat.get_vm("vb") == PlacedVm("h1", b)
    with pytest.raises(NotFound):
        await cat.save_vm(vm("vmissing"))

    assert await cat.delete_vm("va") is True
    assert await cat.delete_vm("va") is False
    assert [p.rec.id for p in await cat.list_vms()] == ["vb", "vc"]


async def test_a_vm_moves_between_hosts_and_only_its_host_writes_it(store: Store) -> None:
    cat = await store.open()
    rec = vm("va", VmState.SUSPENDED)
    await cat.create_vm(rec, "h1")
    assert await cat.move_vm("va", "h2", "h3") is False, "only from the host it is on"
    assert await cat.move_vm("va", "h1", "h2") is True
    assert (await cat.get_vm("va")) == PlacedVm("h2", rec)
    rec.state = VmState.RUNNING
    with pytest.raises(NotFound, match="on host h1"):
        await cat.save_vm(rec, "h1")  # the host it left
    await cat.save_vm(rec, "h2")
    assert await cat.delete_vm("va", "h1") is False
    assert await cat.delete_vm("va", "h2") is True


async def test_set_state_moves_only_from_the_expected_states(store: Store) -> None:
    cat = await store.open()
    await cat.create_vm(vm("va", VmState.SUSPENDED), "h1")
    assert await cat.set_state("va", [VmState.RUNNING, VmState.PAUSED], VmState.SUSPENDING) is False
    assert await cat.set_state("va", [VmState.SUSPENDED], VmState.RESTORING, at=42.0) is True
    placed = await cat.get_vm("va")
    assert placed is not None
    assert (placed.rec.state, placed.rec.state_changed_at) == (VmState.RESTORING, 42.0)
    assert await cat.set_state("nope", [VmState.SUSPENDED], VmState.RESTORING) is False


async def test_of_fifty_concurrent_wakers_on_two_catalogs_exactly_one_restores(store: Store) -> None:
    edge_a, edge_b = await store.open(), await store.open()
    await edge_a.create_vm(vm("va", VmState.SUSPENDED), "h1")
    results = await asyncio.gather(
        *(
            (edge_a if i % 2 else edge_b).set_state("va", [VmState.SUSPENDED], VmState.RESTORING, at=float(i))
            for i in range(50)
        )
    )
    assert results.count(True) == 1
    placed = await edge_b.get_vm("va")
    assert placed is not None
    assert placed.rec.state is VmState.RESTORING
    assert placed.rec.state_changed_at == float(results.index(True))


async def test_activity_is_recorded_in_batches_and_never_moves_back(store: Store) -> None:
    cat = await store.open()
    for vm_id in ("va", "vb", "vc"):
        await cat.create_vm(vm(vm_id, created_at=10.0), "h1")  # last_activity 11.0
    await cat.touch_many({"va": 50.0, "vb": 5.0, "vmissing": 60.0})
    await cat.touch_many({})
    activity = {p.rec.id: p.rec.last_activity for p in await cat.list_vms()}
    assert activity == {"va": 50.0, "vb": 11.0, "vc": 11.0}


async def test_templates_are_known_by_the_hosts_that_hold_them(store: Store) -> None:
    cat = await store.open()
    await cat.add_template("demo", "h1")
    await cat.add_template("demo", "h2")
    await cat.add_template("demo", "h2")
    await cat.add_template("python-sandbox", "h2")
    assert await cat.template_hosts("demo") == {"h1", "h2"}
    await cat.remove_template("demo", "h1")
    assert await cat.template_hosts("demo") == {"h2"}
    assert await cat.template_hosts("python-sandbox") == {"h2"}
    assert await cat.template_hosts("nope") == set()


async def test_the_change_feed_delivers_route_and_state_changes_only(store: Store) -> None:
    cat = await store.open()
    seen: list[str] = []
    later: list[str] = []
    unsubscribe = await cat.subscribe(seen.append)
    await cat.subscribe(later.append)

    rec = vm("va", VmState.SUSPENDED)
    await cat.create_vm(rec, "h1")
    await cat.set_state("va", [VmState.SUSPENDED], VmState.RESTORING)
    await cat.set_state("va", [VmState.SUSPENDED], VmState.RESTORING)  # lost: no change
    await cat.touch_many({"va": 100.0})  # activity is not a change
    await cat.save_vm(rec)
    await cat.delete_vm("va")
    await cat.delete_vm("va")  # nothing left to delete: no change
    await cat.create_vm(vm("vmarker"), "h1")
    await wait_for(lambda: "vmarker" in seen, "the marker VM's notification")
    assert seen == ["va", "va", "va", "va", "vmarker"]

    unsubscribe()
    await cat.create_vm(vm("vafter"), "h1")
    await wait_for(lambda: "vafter" in later, "the notification after unsubscribing")
    assert "vafter" not in seen


async def test_a_failing_subscriber_does_not_stop_the_others(store: Store) -> None:
    cat = await store.open()
    seen: list[str] = []

    def broken(vm_id: str) -> None:
        raise RuntimeError("subscriber bug")

    await cat.subscribe(broken)
    await cat.subscribe(seen.append)
    await cat.create_vm(vm("va"), "h1")
    await wait_for(lambda: seen == ["va"], "the second subscriber's notification")


async def test_migrations_run_once_and_concurrent_starts_agree(store: Store) -> None:
    first, second = await asyncio.gather(store.open(), store.open())
    assert sorted([first.migrated, second.migrated]) == [(), (1, 2, 3, 4, 5, 6)]
    await store.close(first)
    await store.close(second)
    again = await store.open()
    assert again.migrated == ()
    await again.create_vm(vm("va"), "h1")
    assert (await again.get_vm("va")) is not None


async def test_a_vms_h2c_ports_go_through_the_catalog(store: Store) -> None:
    """Edges of a fleet learn a VM's h2c ports (its template's, which its host's registry does not keep) here."""
    cat = await store.open()
    grpc, plain = vm("va"), vm("vb")
    grpc.h2c_ports = (50051, 50052)
    await cat.create_vm(grpc, "h1")
    await cat.create_vm(plain, "h1")
    assert (await cat.get_vm("va")) == PlacedVm("h1", grpc)
    assert [p.rec.h2c_ports for p in await cat.list_vms()] == [(50051, 50052), ()]
    grpc.h2c_ports = (50051,)
    grpc.state = VmState.SUSPENDED
    await cat.save_vm(grpc, "h1")
    assert (await cat.get_vm("va")) == PlacedVm("h1", grpc)


async def test_an_older_schema_is_upgraded(store: Store) -> None:
    old = await store.open(upto=1)
    assert old.migrated == (1,)
    await store.close(old)
    upgraded = await store.open()
    assert upgraded.migrated == (2, 3, 4, 5, 6)
    await upgraded.create_vm(vm("va"), "h1")
    assert [p.host_id for p in await upgraded.list_vms(host_id="h1")] == ["h1"]


async def test_events_of_many_hosts_get_one_gapless_sequence_and_keep_their_host_numbers(store: Store) -> None:
    first, second = await store.open(), await store.open()

    def events(vm_id: str, count: int) -> list[Event]:
        return [Event(i, "running", vm_id, "running", None, time.time(), "demo") for i in range(1, count + 1)]

    appended = await asyncio.gather(
        *(cat.append_events(h, events(f"v{h}", 5)) for cat, h in ((first, "h1"), (second, "h2")))
    )
    assert sorted(e.seq for batch in appended for e in batch) == list(range(1, 11))
    assert [e.seq for e in await second.events_after(0, 100)] == list(range(1, 11))
    assert [e.seq for e in await first.events_after(8, 100)] == [9, 10]
    assert await first.last_host_seq("h1") == 5 and await first.last_host_seq("h3") == 0
    await first.trim_events(3, 0.0)
    assert [e.seq for e in await second.events_after(0, 100)] == [8, 9, 10]
    await first.trim_events(100, time.time() + 1)
    assert [e.seq for e in await second.events_after(0, 100)] == [10]  # the newest holds the seq
    assert [e.seq for e in await first.append_events("h1", events("va", 1))] == [11]


async def test_an_embedded_registry_file_is_adopted_with_its_vms(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    reg = Registry(path)
    rec = vm("va", VmState.SUSPENDED)
    reg.save(rec)
    reg.close()
    cat = await open_catalog(None, path)
    try:
        assert cat.migrated == (1, 2, 3, 4, 5, 6)
        assert await cat.list_vms() == [PlacedVm("", rec)]
    finally:
        await cat.close()


async def test_another_catalog_hears_of_a_change_through_postgres(pg_store: Store) -> None:
    writer, edge = await pg_store.open(), await pg_store.open()
    seen: list[str] = []
    await edge.subscribe(seen.append)
    await writer.create_vm(vm("va", VmState.SUSPENDED), "h1")
    assert await writer.set_state("va", [VmState.SUSPENDED], VmState.RESTORING)
    await wait_for(lambda: seen == ["va", "va"], "the other catalog's notifications")


async def test_a_lost_feed_comes_back_and_reports_the_gap(pg_store: Store) -> None:
    writer, edge = await pg_store.open(), await pg_store.open()
    seen: list[str] = []
    gaps: list[None] = []
    await edge.subscribe(seen.append, on_gap=lambda: gaps.append(None))
    admin = await asyncpg.connect(pg_store.url)
    try:
        killed = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()
    assert len(killed) == 1
    await wait_for(lambda: gaps == [None], "the feed to come back")
    await writer.create_vm(vm("va"), "h1")
    await wait_for(lambda: seen == ["va"], "a notification on the new LISTEN connection")


async def test_a_locked_sqlite_catalog_fails_with_a_catalog_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalog_sqlite, "BUSY_TIMEOUT", 0.05)
    cat = await open_catalog(None, tmp_path / "c.sqlite3")
    other = sqlite3.connect(tmp_path / "c.sqlite3", isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")  # another process holding the write lock too long
        with pytest.raises(CatalogError, match="database is locked"):
            await cat.heartbeat("h1", "10.0.0.1:7000", Capacity(1, 1, 1), at=1.0)
        other.execute("ROLLBACK")
        await cat.heartbeat("h1", "10.0.0.1:7000", Capacity(1, 1, 1), at=1.0)
    finally:
        other.close()
        await cat.close()


async def test_a_sqlite_change_committed_for_a_cancelled_caller_is_still_delivered(tmp_path: Path) -> None:
    cat = await open_catalog(None, tmp_path / "c.sqlite3")
    other = sqlite3.connect(tmp_path / "c.sqlite3", isolation_level=None)
    try:
        await cat.create_vm(vm("va", VmState.SUSPENDED), "h1")
        seen: list[str] = []
        await cat.subscribe(seen.append)
        other.execute("BEGIN IMMEDIATE")  # the catalog's write waits for this lock on its thread
        waker = asyncio.ensure_future(cat.set_state("va", [VmState.SUSPENDED], VmState.RESTORING))
        await asyncio.sleep(0.5)
        waker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waker
        other.execute("ROLLBACK")
        await wait_for(lambda: seen == ["va"], "the notification of the write the cancelled caller started")
        placed = await cat.get_vm("va")
        assert placed is not None
        assert placed.rec.state is VmState.RESTORING
    finally:
        other.close()
        await cat.close()


async def test_a_postgres_catalog_whose_database_is_gone_fails_with_a_catalog_error(
    pg_store: Store, pg_cluster: PgCluster
) -> None:
    cat = await pg_store.open()
    assert pg_store.url is not None
    await drop_database(pg_cluster, pg_store.url)
    with pytest.raises(CatalogError, match=r"^catalog: postgresql://postgres@/t_"):
        await cat.get_vm("va")


async def test_a_url_of_another_kind_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"^catalog\.url: unsupported URL 'mysql://u:\*\*\*@db/x'"):
        await open_catalog("mysql://u:secret@db/x", tmp_path / "c.sqlite3")
    with pytest.raises(CatalogError, match=r"^catalog\.url: not a valid URL"):
        await open_catalog("postgresql://[::1/x", tmp_path / "c.sqlite3")


async def test_an_unreachable_server_is_reported_without_the_password(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"^catalog\.url: cannot connect to postgresql://u:\*\*\*@127\.0\.0\.1:1/x"):
        await open_catalog("postgresql://u:secret@127.0.0.1:1/x", tmp_path / "c.sqlite3")
    with pytest.raises(CatalogError, match=r"^catalog\.url: cannot connect .*password=\*\*\*: ") as caught:
        await open_catalog(f"postgresql://postgres@/x?host={tmp_path}/nowhere&password=secret", tmp_path / "c.sqlite3")
    assert "secret" not in str(caught.value)


async def test_a_missing_database_is_reported_naming_the_key(pg_cluster: PgCluster, tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r'^catalog\.url: cannot connect .*"nosuchdb" does not exist'):
        await open_catalog(pg_cluster.url("nosuchdb"), tmp_path / "c.sqlite3")
