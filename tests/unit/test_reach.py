"""Reaching an upstream (edge/reach.py), the adapter's asynchronous half, with a fake backend
and no sockets: what it reports back to the core for each way a wake or a connect ends."""

from __future__ import annotations

import socket
from typing import Any

from edge.admission import Admission, Refusal
from edge.exchange import Exchange, ExchangeState
from edge.hostnames import HostnameRouter
from edge.metrics import Metrics
from edge.proxy_context import ProxyContext, ProxySettings
from edge.reach import reach
from edge.tokens import SigningKey, TokenService
from edge.upstream import UpstreamConn, UpstreamPool
from tests.unit.proxy_harness import CONTROL, DOMAIN, SECRET, VM, FakeBackend
from vmm.errors import VmFailed
from vmm.model import VmState


class Events:
    """The core's side of reach(): what it was told, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def waiting_for_vm(self, ex: Exchange) -> None:
        self.seen.append(("waiting",))

    def vm_woken(self, ex: Exchange) -> None:
        self.seen.append(("woken",))

    def upstream_opened(self, ex: Exchange, conn: UpstreamConn) -> None:
        self.seen.append(("opened",))

    def reach_refused(self, ex: Exchange, refusal: Refusal) -> None:
        self.seen.append(("refused", refusal.status, refusal.message, refusal.retry_after))

    def reach_failed(self, ex: Exchange, status: int, message: str) -> None:
        self.seen.append(("failed", status, message))

    def reach_crashed(self, ex: Exchange, error: Exception) -> None:
        self.seen.append(("crashed", repr(error)))


def _context(backend: FakeBackend, **settings: Any) -> ProxyContext:
    return ProxyContext(
        backend=backend,
        router=HostnameRouter(DOMAIN, CONTROL),
        tokens=TokenService([SigningKey("k1", "HS256", secret=SECRET)], "k1"),
        metrics=Metrics(),
        pool=UpstreamPool(per_vm=8, idle_timeout=30.0),
        control_socket="",
        settings=ProxySettings(**settings),
    )


def _exchange(running: bool) -> Exchange:
    ex = Exchange(b"GET", True, False, False, False)
    ex.admit(Admission(b"GET / HTTP/1.1\r\n\r\n", VM, 8080, running=running))
    ex.move(ExchangeState.CONNECTING)
    return ex


def _backend(state: VmState) -> FakeBackend:
    backend = FakeBackend()
    backend.add_vm(VM, 0, state=state)
    return backend


async def test_no_vm_is_woken_while_the_edge_drains() -> None:
    backend = _backend(VmState.SUSPENDED)
    ctx = _context(backend)
    ctx.wakes_refused = True
    events = Events()
    await reach(ctx, _exchange(False), events)
    assert events.seen == [("waiting",), ("refused", 503, f"the edge is shutting down: VM {VM} is not woken now", 2)]
    assert backend.ensure_calls == 0


async def test_requests_past_the_per_vm_bound_are_not_held() -> None:
    backend = _backend(VmState.SUSPENDED)
    ctx = _context(backend, max_held_per_vm=3)
    ctx.held[VM] = 3
    events = Events()
    await reach(ctx, _exchange(False), events)
    assert events.seen == [("waiting",), ("refused", 503, f"too many requests are waiting for VM {VM} to wake", 2)]
    assert ctx.held == {VM: 3}, "its place was never taken"


async def test_a_failed_wake_is_refused_with_its_status_and_counted_once() -> None:
    backend = _backend(VmState.SUSPENDED)
    backend.wake_error = VmFailed("qemu died")
    ctx = _context(backend)
    events = Events()
    await reach(ctx, _exchange(False), events)
    assert events.seen == [("waiting",), ("refused", 502, "qemu died", None)]
    assert ctx.held == {}
    assert ctx.metrics.registry.get_sample_value("mvm_wakes_total", {"result": "failed"}) == 1


async def test_a_connect_that_fails_asks_the_vms_owner_once_then_gives_502() -> None:
    backend = _backend(VmState.RUNNING)

    async def refuse(vm_id: str, port: int, timeout: float) -> socket.socket:
        backend.opened += 1
        raise ConnectionRefusedError(111, "Connection refused")

    backend.open_upstream = refuse  # type: ignore[method-assign]
    ctx = _context(backend)
    events = Events()
    await reach(ctx, _exchange(True), events)
    assert events.seen == [
        ("waiting",),
        ("woken",),
        ("failed", 502, f"cannot connect to port 8080 of VM {VM}: Connection refused"),
    ]
    assert (backend.confirm_calls, backend.opened) == (1, 2), "one recheck, one more try, no more"


async def test_a_bug_while_reaching_is_reported_not_raised() -> None:
    backend = _backend(VmState.RUNNING)

    async def broken(vm_id: str, port: int, timeout: float) -> socket.socket:
        raise KeyError("oops")

    backend.open_upstream = broken  # type: ignore[method-assign]
    events = Events()
    await reach(_context(backend), _exchange(True), events)
    assert events.seen == [("crashed", "KeyError('oops')")]
