"""Per-VM usage of a real guest: GET /v1/vms/{id}/metrics read from its cgroup, files and tap,
the per-VM Prometheus series, `mvm vm top --once`, and a suspended VM's zeros."""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import replace
from pathlib import Path

from tests.e2e.edge_harness import CONTROL, edge_config, running_edge
from tests.e2e.fleet_harness import DOMAIN
from tests.e2e.guest import sandbox_run
from tests.e2e.test_cli_e2e import mvm
from tests.e2e.test_fleet import serve_workers
from vmm import cgroups
from vmm.settings import VmmSettings

CGROUP_NAME = "microvm-edge"


async def test_a_running_vms_usage_through_the_api_prometheus_and_top(
    settings: VmmSettings, sandbox_template: str, tmp_path: Path
) -> None:
    cfg = edge_config(settings)
    cfg = replace(cfg, server=replace(cfg.server, per_vm_metrics=True))
    async with running_edge(cfg) as client:
        vm_id = (await client.api("POST", "/v1/vms", {"template": sandbox_template}, status=201))["id"]
        assert await sandbox_run(vm_id, "6 * 7") == 42
        before = await client.api("GET", f"/v1/vms/{vm_id}/metrics", status=200)
        groups = cgroups.detect(CGROUP_NAME)
        assert groups is not None
        limit = groups.read_limits(vm_id).memory_bytes
        assert before["vm"] == vm_id and before["state"] == "running"
        assert before["cpu_seconds"] > 0, before
        assert 0 < before["memory_bytes"] <= before["memory_peak_bytes"], before
        assert before["memory_bytes"] <= limit and before["memory_limit_bytes"] == limit, before
        assert before["disk_bytes"] > 0, before  # the overlay the guest's writes went to
        assert await sandbox_run(vm_id, "len('x' * 100000)") == 100000
        after = await client.api("GET", f"/v1/vms/{vm_id}/metrics", status=200)
        assert after["net_rx_bytes"] > before["net_rx_bytes"] and after["net_tx_bytes"] > before["net_tx_bytes"]
        assert after["cpu_seconds"] >= before["cpu_seconds"] and after["cpu_percent"] >= 0

        async with client.session.get(f"https://{CONTROL}:{client.edge.port}/metrics") as resp:
            exposition = await resp.text()
        assert f'mvm_vm_memory_bytes{{vm="{vm_id}"}}' in exposition
        assert f'mvm_vm_net_rx_bytes{{vm="{vm_id}"}}' in exposition

        config = tmp_path / "cli.toml"
        config.write_text(
            f'[server]\nlisten_port = {client.edge.port}\ntls_cert = "{cfg.server.tls_cert}"\n'
            f'tls_key = "{cfg.server.tls_key}"\n[vmm]\nstate_dir = "{settings.state_dir}"\n'
        )
        code, out, err = await mvm(config, "vm", "top", "--once")
        assert code == 0, err
        rows = [line.split() for line in out.splitlines()]
        assert rows[0][:3] == ["ID", "STATE", "CPU%"] and [vm_id, "running"] in [row[:2] for row in rows[1:]], out

        await top_refreshes_until_ctrl_c(config, vm_id)

        missing = await client.api("GET", "/v1/vms/no-such-vm/metrics", status=404)
        assert missing == {"error": "not_found", "message": "VM 'no-such-vm' does not exist"}

        await client.api("POST", f"/v1/vms/{vm_id}/suspend", status=200)
        asleep = await client.api("GET", f"/v1/vms/{vm_id}/metrics", status=200)
        assert asleep["state"] == "suspended" and asleep["cpu_seconds"] == asleep["cpu_percent"] == 0, asleep
        assert asleep["memory_bytes"] == asleep["memory_peak_bytes"] == 0 and asleep["disk_bytes"] > 0, asleep


async def top_refreshes_until_ctrl_c(config: Path, vm_id: str) -> None:
    """`mvm vm top --interval 0.2` prints the table again and again; Ctrl-C (SIGINT) ends it quietly."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mvm.cli", "vm", "top", "--interval", "0.2", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        tables = 0
        async with asyncio.timeout(60):
            while tables < 3:
                line = (await proc.stdout.readline()).decode()
                assert line, "mvm vm top stopped by itself"
                tables += line.startswith("ID ")
                assert not line.split() or line.startswith("ID ") or line.split()[0] == vm_id, line
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0 and "Traceback" not in err.decode(), err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_per_vm_series_and_metrics_through_edge_workers(settings: VmmSettings, tmp_path: Path) -> None:
    """`mvm serve --workers 2`: a worker answers, asking the host for the VMs' usage."""
    server, log = {"per_vm_metrics": True}, {"level": "warning"}
    async with serve_workers(settings, tmp_path, server=server, log=log) as (_, client):
        vm_id = (await client.api("POST", "/v1/vms", {}, status=201))["id"]
        usage = await client.api("GET", f"/v1/vms/{vm_id}/metrics", status=200)
        assert usage["vm"] == vm_id and usage["cpu_seconds"] > 0 and usage["memory_bytes"] > 0, usage
        for _ in range(4):  # any worker may answer the scrape
            status, _, body = await client.request(f"api.{DOMAIN}", "GET", "/metrics")
            assert status == 200 and f'mvm_vm_memory_bytes{{vm="{vm_id}"}}' in body.decode()
        missing = await client.api("GET", "/v1/vms/no-such-vm/metrics", status=404)
        assert missing["error"] == "not_found", missing
        await client.api("DELETE", f"/v1/vms/{vm_id}", status=204)
