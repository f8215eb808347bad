"""Reaching where a request goes when no pooled connection is at hand: the I/O half of it.

The VM is woken if it sleeps (the request held within the per-VM bound), a connection is
opened, and a connect that fails asks the VM's owner once more. Every outcome goes back to
the connection's core as an event; this module decides nothing about the client.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from vmm.errors import VmmError
from vmm.jsonlog import log
from vmm.model import VmState

from .admission import Refusal
from .exchange import Exchange
from .proxy_context import ProxyContext, count_down
from .upstream import UpstreamConn, connect_unix, connect_vm

QUEUE_POLL = 0.05  # seconds between looks at whether a queued wake's restore has started
QUEUED_TIMEOUTS = 10  # a wake waits in the restore queue at most this many wake timeouts


class ReachEvents(Protocol):
    """What reaching an upstream reports, in this order: maybe waiting / woken (twice at most),
    then exactly one outcome."""

    def waiting_for_vm(self, ex: Exchange) -> None: ...
    def vm_woken(self, ex: Exchange) -> None: ...
    def upstream_opened(self, ex: Exchange, conn: UpstreamConn) -> None: ...
    def reach_refused(self, ex: Exchange, refusal: Refusal) -> None: ...
    def reach_failed(self, ex: Exchange, status: int, message: str) -> None: ...
    def reach_crashed(self, ex: Exchange, error: Exception) -> None: ...


def vm_running(ctx: ProxyContext, ex: Exchange) -> bool:
    """Asked again when connecting: a queued or retried request may find its VM asleep by now."""
    if ex.vm_id is None:
        return True
    rec = ctx.backend.lookup(ex.vm_id)
    return rec is not None and rec.state is VmState.RUNNING


async def reach(ctx: ProxyContext, ex: Exchange, events: ReachEvents) -> None:
    """Wake the VM if needed and open a connection to it; the outcome goes to `events`.

    A connect that fails has sent nothing: the VM's owner is asked to make it run (this
    edge's view of it may be a moment old, e.g. just suspended by its host) and the connect
    is tried once more.
    """
    try:
        if not vm_running(ctx, ex):
            refusal = await _wait_for_vm(ctx, ex, events, recheck=False)
            if refusal is not None:
                events.reach_refused(ex, refusal)
                return
        try:
            conn = await _connect(ctx, ex)
        except (OSError, TimeoutError, VmmError) as exc:
            if ex.vm_id is None or ex.reconnected:
                raise
            ex.reconnected = True
            log.event("proxy.reconnect", level="info", vm=ex.vm_id, port=ex.port, error=str(exc) or repr(exc))
            refusal = await _wait_for_vm(ctx, ex, events, recheck=True)
            if refusal is not None:
                events.reach_refused(ex, refusal)
                return
            conn = await _connect(ctx, ex)
    except asyncio.CancelledError:
        raise
    except TimeoutError:
        events.reach_failed(ex, 504, f"no connection to {ex.where()} within {ctx.settings.connect_timeout:g}s")
    except VmmError as exc:
        events.reach_failed(ex, exc.http_status, str(exc))
    except OSError as exc:
        events.reach_failed(ex, 502, f"cannot connect to {ex.where()}: {exc.strerror or exc}")
    except Exception as exc:
        events.reach_crashed(ex, exc)
    else:
        events.upstream_opened(ex, conn)


async def _wait_for_vm(ctx: ProxyContext, ex: Exchange, events: ReachEvents, recheck: bool) -> Refusal | None:
    """Hold until the VM has woken, within the per-VM bound; else why the edge answers instead.

    `recheck`: the VM looked running but could not be reached, so its owner is asked
    whatever this edge believes (its view may be a moment old)."""
    s = ctx.settings
    vm_id = ex.vm_id
    assert vm_id is not None
    events.waiting_for_vm(ex)
    if ctx.wakes_refused:
        return Refusal(503, f"the edge is shutting down: VM {vm_id} is not woken now", retry_after=s.retry_after)
    held = ctx.held.get(vm_id, 0)
    if held >= s.max_held_per_vm:
        return Refusal(503, f"too many requests are waiting for VM {vm_id} to wake", retry_after=s.retry_after)
    ctx.held[vm_id] = held + 1
    ctx.metrics.held(1)
    try:
        await _woken(ctx, vm_id, ctx.wake(vm_id, recheck), s.wake_timeout)
    except TimeoutError:
        log.event("proxy.wake_timeout", level="warning", vm=vm_id)
        return Refusal(503, f"VM {vm_id} did not wake within {s.wake_timeout:g}s", retry_after=s.retry_after)
    except VmmError as exc:
        log.event("proxy.wake_failed", level="warning", vm=vm_id, error=str(exc))
        retry = s.retry_after if exc.http_status == 503 else None
        return Refusal(exc.http_status, str(exc), retry_after=retry)
    finally:
        count_down(ctx.held, vm_id)
        ctx.metrics.held(-1)
    events.vm_woken(ex)
    return None


async def _woken(ctx: ProxyContext, vm_id: str, wake: asyncio.Task[bool], timeout: float) -> None:
    """The wake, within `timeout` counted from when its restore starts.

    A VM whose record still says suspended has not started its restore: it waits its turn behind
    others (vmm.max_concurrent_restores, first come first served), and that wait does not count, so
    no queued wake times out while the restores ahead of it go on. The queue is still bounded: at
    most QUEUED_TIMEOUTS times the wake timeout.
    """
    loop = asyncio.get_running_loop()
    queue_deadline = loop.time() + QUEUED_TIMEOUTS * timeout
    while not wake.done() and _queued(ctx, vm_id) and loop.time() < queue_deadline:
        await asyncio.wait((wake,), timeout=QUEUE_POLL)
    await asyncio.wait_for(asyncio.shield(wake), timeout)


def _queued(ctx: ProxyContext, vm_id: str) -> bool:
    rec = ctx.backend.lookup(vm_id)
    return rec is not None and rec.state is VmState.SUSPENDED


async def _connect(ctx: ProxyContext, ex: Exchange) -> UpstreamConn:
    """A new connection to where the request goes: the VM's port, or the control API."""
    timeout = ctx.settings.connect_timeout
    if ex.vm_id is None:
        return await connect_unix(ctx.pool, ctx.control_socket, timeout)
    return await connect_vm(ctx.pool, ctx.backend, ex.vm_id, ex.port, timeout)
