import time
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from fleet.catalog import Capacity, HostRecord, PlacedVm
from fleet.data_port import DataPort, request_line, sign
from fleet.host_client import HostError
from fleet.host_sync import HostAddress
from fleet.move_api import decode_record, encode_record
from fleet.placement import candidates
from fleet.routes import FleetState, RouteTable
from mvm.config import load_config
from vmm.errors import ConfigError, InvalidRequest, NotFound, VmmError
from vmm.model import RamMode, VmRecord, VmState
from vmm.policy import Policy

SECRET = "s" * 40


def host(host_id: str, memory_mb: int) -> HostRecord:
    return HostRecord(host_id, "http://127.0.0.1:1 127.0.0.1:2", Capacity(memory_mb, 2, 1000), time.time(), True)


def test_placement_prefers_free_memory_among_up_hosts_with_the_template() -> None:
    hosts = [host("a", 1000), host("b", 4000), host("c", 8000), host("d", 9000)]
    up = {"a", "b", "c"}.__contains__
    assert [h.id for h in candidates(hosts, {"a", "b", "d"}, up)] == ["b", "a"]
    assert [h.id for h in candidates(hosts, {"a", "b"}, up, wanted="a")] == ["a"]
    assert candidates(hosts, {"d"}, up) == [], "a host that is down is never chosen"


def test_a_host_address_round_trips_through_the_catalog_field() -> None:
    address = HostAddress("http://10.0.0.5:9100", "10.0.0.5:9101")
    assert HostAddress.parse(str(address)) == address


def test_the_data_port_accepts_only_fresh_lines_signed_with_the_secret() -> None:
    port = DataPort(SECRET, lambda vm_id, p: vm_id == "vabc" and p == 8080)
    assert port._check(request_line(SECRET, "vabc", 8080).decode().strip()) == ("vabc", 8080)
    with pytest.raises(VmmError, match="not signed"):
        port._check(request_line("x" * 40, "vabc", 8080).decode().strip())
    old = int(time.time()) - 3600
    with pytest.raises(VmmError, match="too old"):
        port._check(f"MVM-TUNNEL vabc 8080 {old} {sign(SECRET, 'vabc', 8080, old)}")
    with pytest.raises(NotFound):
        port._check(request_line(SECRET, "vabc", 22).decode().strip())
    with pytest.raises(VmmError, match="malformed"):
        port._check("GET / HTTP/1.1")


def test_a_moved_vm_record_survives_the_header() -> None:
    rec = VmRecord("vabc", "demo", VmState.SUSPENDED, Policy(auto_resume=False), 8080, 1.0, 2.0,
                   ram_mode=RamMode.OWN_FILE, state_changed_at=3.0)  # fmt: skip
    assert decode_record(encode_record(rec)) == rec
    with pytest.raises(InvalidRequest, match="X-Mvm-Record"):
        decode_record("bm90IGpzb24")


class _NoCatalog:
    backend = "sqlite"


def test_routes_keep_the_newer_of_a_wake_and_an_older_reload() -> None:
    routes = RouteTable(_NoCatalog(), down_after=5.0, host_refresh=1.0)  # type: ignore[arg-type]
    seen: list[VmState] = []
    routes.listeners.append(lambda rec: seen.append(rec.state))
    rec = VmRecord("vabc", "demo", VmState.SUSPENDED, Policy(), 8080, 1.0, 1.0, state_changed_at=10.0)
    routes._put("vabc", PlacedVm("h1", rec))
    routes.set_state("vabc", VmState.RUNNING, 20.0, 1)
    routes._put("vabc", PlacedVm("h1", replace(rec)))  # news from before the wake
    placed = routes.placed("vabc")
    assert placed is not None and placed.rec.state is VmState.RUNNING
    routes._put("vabc", PlacedVm("h1", replace(rec, state=VmState.SUSPENDED, state_changed_at=30.0)))
    assert seen == [VmState.SUSPENDED]
    routes._put("vabc", None)
    assert routes.placed("vabc") is None and seen[-1] is VmState.TERMINATED
    assert routes.record("vabc") is None


def test_a_vm_whose_host_misses_heartbeats_is_unavailable() -> None:
    routes = RouteTable(_NoCatalog(), down_after=5.0, host_refresh=1.0)  # type: ignore[arg-type]
    rec = VmRecord("vabc", "demo", VmState.RUNNING, Policy(), 8080, 1.0, 1.0)
    routes._put("vabc", PlacedVm("h1", rec))
    routes._hosts = {"h1": replace(host("h1", 1), heartbeat_at=time.time() - 60)}
    shown = routes.record("vabc")
    assert shown is not None and shown.state is FleetState.UNAVAILABLE and rec.state is VmState.RUNNING


def test_cluster_settings_are_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[cluster]\nsecret = "short"\n')
    with pytest.raises(ConfigError, match=r"cluster\.secret: must be at least 32"):
        load_config(cfg)
    cfg.write_text('[cluster]\ntls = true\nhost_listen = "0.0.0.0:9100"\n')
    with pytest.raises(ConfigError, match=r"cluster\.secret: replace the development default"):
        load_config(cfg)
    cfg.write_text('[cluster]\nhost_listen = "nowhere"\n')
    with pytest.raises(ConfigError, match=r"cluster\.host_listen"):
        load_config(cfg)
    cfg.write_text('[cluster]\nhost_id = "Bad_Name"\n')
    with pytest.raises(ConfigError, match=r"cluster\.host_id"):
        load_config(cfg)


class _Catalog:
    backend = "postgres"

    async def template_hosts(self, name: str) -> set[str]:
        return {"h1", "h2"}


class _Routes:
    catalog = _Catalog()

    def hosts(self) -> list[HostRecord]:
        return [host("h1", 9000), host("h2", 1000)]

    def host_up(self, host_id: str) -> bool:
        return True

    async def reload(self, vm_id: str) -> None:
        return None


class _FullFirstHost:
    """h1 (the most free memory in the catalog) turns out to be full; h2 takes the VM."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def call(self, host_id: str, address: str, method: str, path: str, body: object = None) -> dict[str, str]:
        self.asked.append(host_id)
        if host_id == "h1":
            raise HostError(507, "host h1: this host cannot take a 256 MiB VM")
        return {"id": "vnew", "state": "running"}


async def test_a_full_host_passes_the_new_vm_to_the_next() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from edge.metrics import Metrics
    from edge.settings import token_service
    from fleet.edge_control import build_edge_control_app

    cfg = load_config(None)
    hosts = _FullFirstHost()
    app = build_edge_control_app(cfg, _Routes(), hosts, token_service(cfg.tokens), Metrics())  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        auth = {"Authorization": f"Bearer {cfg.server.admin_key}"}
        resp = await client.post("/v1/vms", json={}, headers=auth)
        assert resp.status == 201 and (await resp.json())["host"] == "h2"
        assert hosts.asked == ["h1", "h2"]
        resp = await client.post("/v1/vms", json={"host": "h1"}, headers=auth)
        body = await resp.json()
        assert resp.status == 507 and "h1" in body["message"] and "cannot take" in body["message"]


class _EmptyCatalog(_Catalog):
    async def template_hosts(self, name: str) -> set[str]:
        return set()


class _NoTemplateAnywhere(_Routes):
    catalog = _EmptyCatalog()


async def _create_through_the_edge(routes: object, hosts: _FullFirstHost, body: object) -> tuple[int, str]:
    """POST /v1/vms to a fleet edge's control app over `routes` and `hosts`: the status and the body."""
    from aiohttp.test_utils import TestClient, TestServer

    from edge.metrics import Metrics
    from edge.settings import token_service
    from fleet.edge_control import build_edge_control_app

    cfg = load_config(None)
    app = build_edge_control_app(cfg, routes, hosts, token_service(cfg.tokens), Metrics())  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        auth = {"Authorization": f"Bearer {cfg.server.admin_key}"}
        resp = await client.post("/v1/vms", json=body, headers=auth)
        return resp.status, await resp.text()


@pytest.mark.parametrize(
    ("template", "status", "message"),
    [
        ("../../x", 422, "template name '../../x' must match [a-z][a-z0-9]{0,30}"),
        (7, 422, "template name 7 must match [a-z][a-z0-9]{0,30}"),
        ("nope", 404, "template 'nope' does not exist on any host (create it with `mvm template create`)"),
    ],
)
async def test_the_edge_validates_a_template_name_like_a_host_and_an_unknown_one_is_404(
    template: object, status: int, message: str
) -> None:
    hosts = _FullFirstHost()
    answer, text = await _create_through_the_edge(_NoTemplateAnywhere(), hosts, {"template": template})
    assert (answer, orjson.loads(text)["message"]) == (status, message)
    assert hosts.asked == []


class _ParentOnH2(_Routes):
    """VM vparent lives on h2, the host with less free memory: placement alone would pick h1."""

    parent = PlacedVm("h2", VmRecord("vparent", "demo", VmState.RUNNING, Policy(), 8080, 1.0, 1.0))

    def placed(self, vm_id: str) -> PlacedVm | None:
        return self.parent if vm_id == "vparent" else None

    def reachable_host(self, placed: PlacedVm) -> HostRecord:
        return next(h for h in self.hosts() if h.id == placed.host_id)


@pytest.mark.parametrize(
    ("body", "status", "asked"),
    [
        ({"from_checkpoint": "vparent/p"}, 201, ["h2"]),
        ({"from_checkpoint": "vparent/p", "host": "h2"}, 201, ["h2"]),
        ({"from_checkpoint": "vparent/p", "host": "h1"}, 422, []),
        ({"from_checkpoint": "vnosuch/p"}, 404, []),
        ({"from_checkpoint": "no-slash"}, 422, []),
    ],
    ids=["to the parent's host", "pinned there", "pinned elsewhere", "unknown VM", "not vm/name"],
)
async def test_a_vm_from_a_checkpoint_starts_on_the_checkpoints_host(
    body: dict[str, str], status: int, asked: list[str]
) -> None:
    hosts = _FullFirstHost()
    answer, text = await _create_through_the_edge(_ParentOnH2(), hosts, body)
    assert answer == status, text
    assert hosts.asked == asked
    if status == 201:
        assert orjson.loads(text)["host"] == "h2"
