"""The idle reaper: pauses, suspends and terminates VMs by their policy.

Activity is the last request or streamed byte (kept by the manager via `touch`); a VM
with an open request or WebSocket counts as active whatever its timestamps say.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from vmm.errors import VmmError
from vmm.jsonlog import log
from vmm.manager import VmManager
from vmm.model import VmRecord, VmState


def due_action(rec: VmRecord, now: float, open_streams: int) -> str | None:
    """What the policy asks for now: 'delete', 'suspend', 'pause' or nothing."""
    pol = rec.policy
    if pol.max_lifetime is not None and now - rec.created_at >= pol.max_lifetime:
        return "delete"
    if open_streams > 0:
        return None
    idle = now - rec.last_activity
    live = rec.state in (VmState.RUNNING, VmState.PAUSED)
    if live and pol.idle_suspend_after is not None and idle >= pol.idle_suspend_after:
        return "suspend"
    if rec.state is VmState.RUNNING and pol.idle_pause_after is not None and idle >= pol.idle_pause_after:
        return "pause"
    return None


async def reap_once(manager: VmManager, open_streams: Mapping[str, int]) -> None:
    now = time.time()
    for rec in list(manager.list_vms()):
        streams = open_streams.get(rec.id, 0)
        if streams:
            manager.touch(rec.id)
        action = due_action(rec, now, streams)
        if action is None:
            continue
        try:
            await getattr(manager, action)(rec.id)
            log.event(f"reaper.{action}", vm=rec.id, idle=round(now - rec.last_activity, 1))
        except VmmError as exc:
            log.event("reaper.error", level="warning", vm=rec.id, action=action, error=str(exc))


async def run(manager: VmManager, open_streams: Mapping[str, int], interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await reap_once(manager, open_streams)
