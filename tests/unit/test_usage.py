"""Per-VM usage (vmm/usage.py): CPU % from two samples, disk bytes from the VM's files, the tap's
counters from /proc/net/dev, and the manager's reading of a running and a suspended VM (fake runtime)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from edge.control import build_control_app
from edge.metrics import Metrics
from edge.settings import DEV_ADMIN_KEY, ServerConfig, TokensConfig, token_service
from fleet.catalog import HostRecord
from fleet.edge_control import HostsUsage, build_edge_control_app
from microvm_edge import AsyncClient
from microvm_edge import NotFound as SdkNotFound
from mvm import top
from mvm.config import load_config
from tests.unit.fake_runtime import FakeRuntime, write_template
from tests.unit.test_fleet_parts import host
from vmm.cgroups import GroupUsage
from vmm.errors import NotFound, NotRunning
from vmm.manager import VmManager
from vmm.network import netns
from vmm.settings import VmmSettings
from vmm.usage import UsageMeter, VmUsage, disk_bytes


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cpu_percent_is_cpu_time_over_wall_time_between_two_samples() -> None:
    clock = Clock()
    meter = UsageMeter(clock)
    assert meter.cpu_percent("a", 5_000_000_000) == 0.0  # no earlier sample
    clock.now += 2.0
    assert meter.cpu_percent("a", 6_000_000_000) == 50.0  # 1 s of CPU in 2 s
    clock.now += 1.0
    assert meter.cpu_percent("a", 8_000_000_000) == 200.0  # two vCPUs busy
    assert meter.cpu_percent("b", 1) == 0.0  # each VM has its own sample
    clock.now += 1.0
    assert meter.cpu_percent("a", 1_000_000) == 0.0  # a new QEMU's group counts from 0 again
    clock.now += 1.0
    assert meter.cpu_percent("a", 251_000_000) == 25.0
    meter.forget("a")
    clock.now += 1.0
    assert meter.cpu_percent("a", 999_000_000_000) == 0.0


def test_a_vm_without_a_group_reads_zero_cpu_and_memory_but_its_disk_and_tap(tmp_path: Path) -> None:
    clock = Clock()
    meter = UsageMeter(clock)
    (tmp_path / "disk.qcow2").write_bytes(b"x" * 8192)
    running = meter.read("a", "running", GroupUsage(3_000_000_000, 50 << 20, 60 << 20, 672 << 20), tmp_path, (10, 20))
    assert (running.cpu_seconds, running.memory_bytes, running.memory_peak_bytes) == (3.0, 50 << 20, 60 << 20)
    assert (running.memory_limit_bytes, running.net_rx_bytes, running.net_tx_bytes) == (672 << 20, 10, 20)
    suspended = meter.read("a", "suspended", None, tmp_path, (10, 20)).to_dict()
    assert suspended["cpu_seconds"] == suspended["cpu_percent"] == suspended["memory_bytes"] == 0
    assert suspended["memory_peak_bytes"] == 0 and suspended["memory_limit_bytes"] == -1
    assert suspended["disk_bytes"] >= 8192 and suspended["net_rx_bytes"] == 10
    clock.now += 1.0  # the sample was forgotten with the group: the next QEMU's first read says 0 %
    assert meter.read("a", "running", GroupUsage(500_000_000, 1, 1, -1), tmp_path, None).cpu_percent == 0.0


def test_disk_bytes_count_allocated_blocks_of_the_overlay_and_ram_file(tmp_path: Path) -> None:
    assert disk_bytes(tmp_path) == 0
    with open(tmp_path / "ram", "wb") as ram:
        ram.truncate(256 << 20)  # sparse: nothing written, nothing held
    assert disk_bytes(tmp_path) == 0
    (tmp_path / "disk.qcow2").write_bytes(b"q" * 65536)
    (tmp_path / "state").write_bytes(b"s" * 65536)  # the snapshot is not the VM's disk
    assert 65536 <= disk_bytes(tmp_path) < 2 * 65536


def test_dev_bytes_reads_the_interface_line_of_proc_net_dev() -> None:
    text = (
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls"
        " carrier compressed\n"
        "    lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0"
        "       0          0\n"
        "  tap0:    4242      31    0    0    0     0          0         0     9000      40    0    0    0     0"
        "       0          0\n"
    )
    assert netns.dev_bytes(text, "tap0") == (4242, 9000)
    assert netns.dev_bytes(text, "eth0") is None


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[tuple[VmManager, FakeRuntime]]:
    settings = VmmSettings(state_dir=tmp_path, memory_reserve_mb=0, guest_sync=False)
    write_template(settings)
    fake = FakeRuntime(settings)
    vms = VmManager(settings, runtime=fake)
    await vms.start()
    try:
        yield vms, fake
    finally:
        await vms.close()


async def test_the_manager_reads_a_running_vm_from_its_group_and_a_suspended_one_as_zeros(
    manager: tuple[VmManager, FakeRuntime],
) -> None:
    vms, fake = manager
    vm_id = (await vms.create_vm("demo")).id
    fake.groups[vm_id] = GroupUsage(2_000_000_000, 80 << 20, 90 << 20, 672 << 20)
    fake.taps[vm_id] = (1000, 2000)
    usage = vms.usage(vm_id)
    assert (usage.state, usage.cpu_seconds, usage.memory_bytes, usage.net_tx_bytes) == ("running", 2.0, 80 << 20, 2000)
    assert [u.vm for u in vms.usage_all()] == [vm_id]
    await vms.suspend(vm_id)
    usage = vms.usage(vm_id)
    assert (usage.state, usage.cpu_seconds, usage.memory_bytes, usage.net_rx_bytes) == ("suspended", 0.0, 0, 1000)
    with pytest.raises(NotFound):
        vms.usage("no-such-vm")


async def test_the_control_api_and_the_sdk_answer_a_vms_metrics_and_404_for_an_unknown_one(
    manager: tuple[VmManager, FakeRuntime],
) -> None:
    vms, fake = manager
    vm_id = (await vms.create_vm("demo")).id
    fake.groups[vm_id] = GroupUsage(1_000_000_000, 40 << 20, 50 << 20, 672 << 20)
    app = build_control_app(ServerConfig(tls=False), vms, token_service(TokensConfig()), Metrics())
    async with TestServer(app, host="127.0.0.1") as server:
        async with AsyncClient(str(server.make_url("")), DEV_ADMIN_KEY) as sdk:
            got = await sdk.metrics(vm_id)
            assert (got.vm, got.state, got.cpu_seconds, got.memory_bytes) == (vm_id, "running", 1.0, 40 << 20)
            assert got.memory_limit_bytes == 672 << 20 and got.raw["memory_peak_bytes"] == 50 << 20
            with pytest.raises(SdkNotFound):
                await sdk.metrics("no-such-vm")
        auth = {"Authorization": f"Bearer {DEV_ADMIN_KEY}"}
        async with aiohttp.ClientSession(headers=auth) as http, http.get(server.make_url("/v1/vms/nope/metrics")) as r:
            assert r.status == 404 and r.content_type == "application/json"
            assert await r.json() == {"error": "not_found", "message": "VM 'nope' does not exist"}


async def test_top_shows_running_vms_busiest_first_and_leaves_suspended_ones_out(
    manager: tuple[VmManager, FakeRuntime],
) -> None:
    vms, fake = manager
    idle, busy, asleep = [(await vms.create_vm("demo")).id for _ in range(3)]
    await vms.suspend(asleep)
    fake.groups[idle] = GroupUsage(0, 30 << 20, 31 << 20, 672 << 20)
    fake.groups[busy] = GroupUsage(0, 300 << 20, 310 << 20, 672 << 20)
    fake.taps[busy] = (1536, 3 << 30)
    app = build_control_app(ServerConfig(tls=False), vms, token_service(TokensConfig()), Metrics())
    async with TestServer(app, host="127.0.0.1") as server, AsyncClient(str(server.make_url("")), DEV_ADMIN_KEY) as sdk:
        await top.sample(sdk)  # the first read of each VM: 0 %
        fake.groups[busy] = GroupUsage(10**12, 300 << 20, 310 << 20, 672 << 20)  # far more CPU since
        lines = top.table(await top.sample(sdk)).splitlines()
    assert lines[0].split() == ["ID", "STATE", "CPU%", "MEM", "PEAK", "DISK", "NET", "RX", "NET", "TX"]
    assert lines[1].split()[:2] == [busy, "running"] and float(lines[1].split()[2]) > 0
    assert lines[1].split()[3:] == ["300.0MiB", "310.0MiB", "0B", "1.5KiB", "3.0GiB"]
    assert lines[2].split()[:3] == [idle, "running", "0.0"]
    assert len(lines) == 3 and asleep not in "".join(lines)
    assert top.table([]).splitlines()[1] == "(no running VMs)"


class _TwoHosts:
    def hosts(self) -> list[HostRecord]:
        return [host("h1", 9000), host("h2", 1000)]

    def host_up(self, host_id: str) -> bool:
        return True


class _HostApis:
    """h1 holds one VM; h2 does not answer."""

    async def call(self, host_id: str, address: str, method: str, path: str, body: object = None) -> object:
        assert (method, path) == ("GET", "/v1/host/usage")
        if host_id == "h2":
            raise NotRunning("host h2 did not answer")
        return {"vms": [VmUsage("vmh1", "running", 0.0, 1.5, 10.0, 64, 65, 96, 4096, 7, 8).to_dict()]}


async def test_a_fleet_edges_metrics_carry_each_up_hosts_per_vm_series() -> None:
    """The hosts hold the VMs: with per_vm_metrics the edge asks them at scrape time; a host down costs its series."""
    cfg = load_config(None)
    usage = HostsUsage()
    tokens, metrics = token_service(cfg.tokens), Metrics(None, usage)
    app = build_edge_control_app(cfg, _TwoHosts(), _HostApis(), tokens, metrics, usage)  # type: ignore[arg-type]
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as http:
        resp = await http.get(server.make_url("/metrics"))
        text = await resp.text()
    assert resp.status == 200
    assert 'mvm_vm_cpu_seconds{vm="vmh1"} 1.5' in text and 'mvm_vm_net_tx_bytes{vm="vmh1"} 8.0' in text
