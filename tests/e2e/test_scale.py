"""Many VMs on one machine (issue 17), small counts: the bounded restore queue serves every queued
wake in order. Scale cases (hundreds of VMs, 50 wakes at once) are in bench/scale_bench.py."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from tests.e2e.edge_harness import bearer, edge_config, running_edge
from vmm.model import VmState
from vmm.settings import VmmSettings


async def test_three_wakes_at_once_with_one_restore_at_a_time_are_all_answered_in_order(
    settings: VmmSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = edge_config(replace(settings, max_concurrent_restores=1), wake_timeout=30.0)
    async with running_edge(cfg) as client:
        manager = client.edge.manager
        ids = [await client.create_vm() for _ in range(3)]
        tokens = [await client.token(vm_id) for vm_id in ids]
        for vm_id in ids:
            await client.api("POST", f"/v1/vms/{vm_id}/suspend", status=200)
        restored: list[str] = []
        first_may_go = asyncio.Event()
        real_load = manager.runtime.load

        async def load(vm: Any, *args: Any, **kwargs: Any) -> None:
            if args[4] == "restore":  # purpose
                restored.append(vm.rec.id)
                if len(restored) == 1:
                    await first_may_go.wait()  # the first restore holds the one slot until the others queue
            await real_load(vm, *args, **kwargs)

        monkeypatch.setattr(manager.runtime, "load", load)

        async def fetch(vm_id: str, token: str) -> tuple[int, Any]:
            async with client.session.get(client.vm_url(vm_id), headers=bearer(token)) as resp:
                return resp.status, await resp.json()

        tasks = []
        async with asyncio.timeout(30):
            for n, (vm_id, token) in enumerate(zip(ids, tokens, strict=True)):
                tasks.append(asyncio.create_task(fetch(vm_id, token)))
                while len(restored) + manager.restores.queued < n + 1:  # this wake has reached the gate
                    await asyncio.sleep(0.01)
        assert (manager.restores.running, manager.restores.queued) == (1, 2)
        assert [manager.get(v).state for v in ids] == [VmState.RESTORING, VmState.SUSPENDED, VmState.SUSPENDED]
        first_may_go.set()
        answers = await asyncio.gather(*tasks)
        assert [status for status, _ in answers] == [200, 200, 200]
        assert [body["counter"] for _, body in answers] == [1, 1, 1]
        assert restored == ids, "queued wakes are served in the order they asked"
