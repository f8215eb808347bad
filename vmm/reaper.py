"""The idle reaper: pauses, suspends and terminates VMs by their policy.

Activity is the last request or streamed byte (kept by the manager via `touch`); a VM
with open work (a request, WebSocket, exec, shell or file transfer, counted by the manager's
`vmm.open_work.OpenWork` in every mode) counts as active whatever its timestamps say.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from .errors import VmmError
from .jsonlog import log
from .model import VmRecord, VmState


class ReapedVms(Protocol):
    """What the reaper needs of the VM plane (vmm.manager.VmManager)."""

    def list_vms(self) -> list[VmRecord]: ...
    def busy_count(self, vm_id: str) -> int:
        """Open work on the VM, wherever it runs (vmm.open_work.OpenWork)."""

    def touch(self, vm_id: str, at: float | None = None) -> None: ...
    async def guest_traffic_age(self, vm_id: str) -> float | None:
        """Seconds since bytes last moved on a connection to the guest (None: no connection)."""

    async def pause(self, vm_id: str) -> VmRecord: ...
    async def suspend(self, vm_id: str, reason: str | None = ...) -> VmRecord: ...
    async def delete(self, vm_id: str, reason: str = ...) -> None: ...


class ReapAction(enum.Enum):
    """What the policy asks of a VM; the value names its log event (`reaper.<value>`)."""

    PAUSE = "pause"
    SUSPEND = "suspend"
    DELETE = "delete"


def due_action(rec: VmRecord, now: float, open_work: int) -> ReapAction | None:
    """What the policy asks for now, if anything; open work only holds off the idle steps."""
    pol = rec.policy
    if pol.max_lifetime is not None and now - rec.created_at >= pol.max_lifetime:
        return ReapAction.DELETE
    suspended_for = now - rec.state_changed_at
    if rec.state is VmState.SUSPENDED and pol.suspended_ttl is not None and suspended_for >= pol.suspended_ttl:
        return ReapAction.DELETE
    if open_work > 0:
        return None
    # A VM that has just started running (created, resumed, restored) is not idle from before:
    # whoever woke it may not have touched it yet, and must not find it suspended again.
    since = max(rec.last_activity, rec.state_changed_at) if rec.state is VmState.RUNNING else rec.last_activity
    idle = now - since
    live = rec.state in (VmState.RUNNING, VmState.PAUSED)
    if live and pol.idle_suspend_after is not None and idle >= pol.idle_suspend_after:
        return ReapAction.SUSPEND
    if rec.state is VmState.RUNNING and pol.idle_pause_after is not None and idle >= pol.idle_pause_after:
        return ReapAction.PAUSE
    return None


class Reaper:
    """Runs `due_action` over all VMs every `interval` seconds.

    An action is never cut short: stopping the reaper waits for a suspend under way, so no
    VM is left half-suspended; and no error, expected or not, ends the sweeps.
    """

    def __init__(self, vms: ReapedVms, interval: float) -> None:
        self.vms = vms
        self.interval = interval
        self._loop_task: asyncio.Task[None] | None = None
        self._pending: asyncio.Task[object] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._pending is not None:
            with contextlib.suppress(Exception):
                await self._pending

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.reap_once()

    def _action(self, action: ReapAction, rec: VmRecord, now: float) -> Coroutine[Any, Any, object]:
        if action is ReapAction.PAUSE:
            return self.vms.pause(rec.id)
        if action is ReapAction.SUSPEND:
            return self.vms.suspend(rec.id, f"idle for {rec.policy.idle_suspend_after:g} s")
        lifetime = rec.policy.max_lifetime
        if lifetime is not None and now - rec.created_at >= lifetime:
            return self.vms.delete(rec.id, f"reached its max_lifetime of {lifetime:g} s")
        return self.vms.delete(rec.id, f"suspended for longer than its suspended_ttl of {rec.policy.suspended_ttl:g} s")

    async def _still_idle(self, rec: VmRecord, now: float, open_work: int) -> ReapAction | None:
        """Before an idle step: bytes that reached the guest since its last recorded activity count too.
        A request through an edge in another process is reported to the host only in that edge's next
        batch; the guest's namespace has seen it already."""
        try:
            age = await self.vms.guest_traffic_age(rec.id)
        except VmmError as exc:
            log.event("reaper.traffic_unknown", level="warning", vm=rec.id, error=str(exc))
            return due_action(rec, now, open_work)
        if age is not None:
            self.vms.touch(rec.id, now - age)
        return due_action(rec, now, open_work)

    async def reap_once(self) -> None:
        now = time.time()
        for rec in list(self.vms.list_vms()):
            open_work = self.vms.busy_count(rec.id)
            if open_work:
                self.vms.touch(rec.id)
            action = due_action(rec, now, open_work)
            if action in (ReapAction.PAUSE, ReapAction.SUSPEND):
                action = await self._still_idle(rec, now, open_work)
            if action is None:
                continue
            self._pending = asyncio.create_task(self._action(action, rec, now))
            try:
                await asyncio.shield(self._pending)
                idle = round(now - rec.last_activity, 1)
                log.event(f"reaper.{action.value}", vm=rec.id, idle=idle, state=rec.state.value)
            except VmmError as exc:
                log.event("reaper.error", level="warning", vm=rec.id, action=action.value, error=str(exc))
            except Exception as exc:
                log.event("reaper.error", level="error", vm=rec.id, action=action.value, error=repr(exc))
            self._pending = None
