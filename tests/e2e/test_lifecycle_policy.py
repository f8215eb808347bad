"""The anchor's idle policy through the edge, with real guests: auto_resume=false, suspended_ttl, states."""

from __future__ import annotations

import asyncio
import time

from tests.e2e.edge_harness import Client, bearer, edge_config, running_edge
from tests.e2e.test_crash_safety import qemus_of
from vmm.network import netns
from vmm.settings import VmmSettings


async def _state(client: Client, vm_id: str) -> str:
    return str((await client.api("GET", f"/v1/vms/{vm_id}", status=200))["state"])


async def test_auto_resume_false_answers_503_until_an_explicit_resume(settings: VmmSettings) -> None:
    async with running_edge(edge_config(settings)) as client:
        vm_id = await client.create_vm(auto_resume=False)
        token = await client.token(vm_id)
        first = await client.get_json(vm_id, token)
        await client.api("POST", f"/v1/vms/{vm_id}/suspend", status=200)
        for _ in range(2):
            async with client.session.get(client.vm_url(vm_id), headers=bearer(token)) as resp:
                body = await resp.json()
                assert resp.status == 503 and resp.headers["Retry-After"], body
                assert "auto_resume=false" in body["message"]
        assert await _state(client, vm_id) == "suspended" and qemus_of(vm_id) == [], "the request did not wake it"
        await client.api("POST", f"/v1/vms/{vm_id}/resume", status=200)
        woke = await client.get_json(vm_id, token)
        assert (woke["boot_id"], woke["counter"]) == (first["boot_id"], first["counter"] + 1)


async def test_a_vm_suspended_past_its_ttl_is_terminated_and_its_files_removed(settings: VmmSettings) -> None:
    async with running_edge(edge_config(settings)) as client:
        vm_id = await client.create_vm(suspended_ttl=3600)
        await client.api("POST", f"/v1/vms/{vm_id}/suspend", status=200)
        vm_dir = client.edge.manager.vm_dir(vm_id)
        assert (vm_dir / "state").exists()
        # An hour later, as the reaper sees it (the record is what it reads; no test waits an hour).
        client.edge.manager.get(vm_id).state_changed_at = time.time() - 3600
        async with asyncio.timeout(20):
            while await _state(client, vm_id) != "terminated":
                await asyncio.sleep(0.1)
        assert not vm_dir.exists() and not netns.exists(vm_id)
        vm = await client.api("GET", f"/v1/vms/{vm_id}", status=200)
        assert vm["state"] == "terminated" and "suspended_ttl" in vm["reason"]
        listed = await client.api("GET", "/v1/vms", status=200)
        assert vm_id not in str(listed), "a terminated VM is only kept for `vm get`"
