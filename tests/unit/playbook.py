"""Playbooks for the connection core: events in, the actions it asked for out, no I/O.

`Play` holds one `ConnectionCore` whose adapter is a recorder: every action (a write to the
client, a pause, a timer, a pooled upstream asked for, an upstream reached, and what was done
on an upstream) is appended to one list as a tuple. Each event method returns the actions
it caused, so a test reads as the list of events with the actions expected after each.
Time is a number the test moves; nothing sleeps and no socket is opened.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from edge.admission import Refusal
from edge.connection_core import ConnectionCore
from edge.connection_io import Upstream
from edge.exchange import Exchange
from edge.hostnames import HostnameRouter
from edge.metrics import Metrics
from edge.proxy_context import ProxyContext, ProxySettings
from edge.tokens import SigningKey, TokenService
from edge.upstream import Owner, ResponseTracker, UpstreamPool
from tests.unit.proxy_harness import CONTROL, DOMAIN, SECRET, VM, FakeBackend
from vmm.model import VmState

CLIENT = b"203.0.113.9"
START = 1000.0
Action = tuple[Any, ...]


class FakeUpstream:
    """An upstream connection that records what the core does with it."""

    def __init__(self, play: Play) -> None:
        self._play = play
        self.owner: Owner | None = None
        self.tracker = ResponseTracker()
        self.write_paused = False

    def send(self, data: bytes) -> None:
        self._play.actions.append(("upstream", bytes(data)))

    def send_parts(self, parts: Iterable[bytes]) -> None:
        self._play.actions.append(("upstream", b"".join(parts)))

    def pause_reading(self) -> None:
        self._play.actions.append(("upstream_pause",))

    def resume_reading(self) -> None:
        self._play.actions.append(("upstream_resume",))

    def finish(self, now: float, reusable: bool) -> None:
        ok = reusable and self.tracker.done and self.tracker.keep_alive and not self.tracker.extra
        self._play.actions.append(("pooled" if ok else "upstream_close",))

    def close(self) -> None:
        self._play.actions.append(("upstream_close",))


class Play:
    """One client connection's core between a scripted client, pool, wake and upstream."""

    def __init__(
        self, *, vm_state: VmState = VmState.RUNNING, can_half_close: bool = True, others_open: int = 0,
        **settings: Any,
    ) -> None:  # fmt: skip
        self.now = START
        self.actions: list[Action] = []
        self.pooled: list[FakeUpstream] = []  # what the pool hands out next, last first
        self.reaching: Exchange | None = None
        self.upstream: FakeUpstream | None = None  # the last one handed to the core
        self.backend = FakeBackend()
        self.backend.add_vm(VM, 0, state=vm_state)
        self.tokens = TokenService([SigningKey("k1", "HS256", secret=SECRET)], "k1", clock=lambda: self.now)
        self.ctx = ProxyContext(
            backend=self.backend,
            router=HostnameRouter(DOMAIN, CONTROL),
            tokens=self.tokens,
            metrics=Metrics(),
            pool=UpstreamPool(per_vm=8, idle_timeout=30.0),
            control_socket="",
            settings=ProxySettings(**settings),
        )
        if others_open:  # connections from the same address already open
            self.ctx.per_ip[CLIENT] = others_open
        self.core = ConnectionCore(self.ctx, b"https", self, lambda: self.now)
        self.core.connected(CLIENT, can_half_close)
        self.started = self.take()  # what connecting asked for

    # -- the recorder: ConnectionIo ----------------------------------------------------------

    def send_client(self, data: bytes) -> None:
        self.actions.append(("send", bytes(data)))

    def pause_client(self) -> None:
        self.actions.append(("pause",))

    def resume_client(self) -> None:
        self.actions.append(("resume",))

    def half_close_client(self) -> None:
        self.actions.append(("half_close",))

    def close_client(self) -> None:
        self.actions.append(("close",))

    def abort_client(self) -> None:
        self.actions.append(("abort",))

    def set_timer(self, at: float) -> None:
        self.actions.append(("timer", at - START))

    def cancel_timer(self) -> None:
        self.actions.append(("cancel_timer",))

    def take_pooled(self, key: str, port: int, now: float, generation: int) -> Upstream | None:
        upstream = self.pooled.pop() if self.pooled else None
        self.actions.append(("take_pooled", upstream is not None))
        if upstream is not None:
            self.upstream = upstream
        return upstream

    def reach(self, ex: Exchange) -> None:
        self.reaching = ex
        self.actions.append(("reach", ex.vm_id))

    def cancel_reach(self) -> None:
        if self.reaching is not None:  # the adapter cancels only a task still running
            self.reaching = None
            self.actions.append(("cancel_reach",))

    def advance_soon(self) -> None:
        self.actions.append(("advance_soon",))

    def drain(self) -> None:
        self.core.drain()

    def abort(self) -> None:
        self.actions.append(("abort",))

    # -- events ------------------------------------------------------------------------------

    def take(self) -> list[Action]:
        done, self.actions = self.actions, []
        return done

    def client(self, data: bytes) -> list[Action]:
        self.core.client_data(data)
        return self.take()

    def upstream_says(self, data: bytes) -> list[Action]:
        self.core.upstream_data(data)
        return self.take()

    def upstream_gone(self) -> list[Action]:
        assert self.upstream is not None
        self.core.upstream_lost(self.upstream)
        return self.take()

    def upstream_full(self) -> list[Action]:
        self.core.upstream_pause_writing()
        return self.take()

    def upstream_drained(self) -> list[Action]:
        self.core.upstream_resume_writing()
        return self.take()

    def waiting(self) -> list[Action]:
        assert self.reaching is not None
        self.core.waiting_for_vm(self.reaching)
        return self.take()

    def woken(self) -> list[Action]:
        assert self.reaching is not None
        self.core.vm_woken(self.reaching)
        return self.take()

    def opened(self) -> list[Action]:
        ex, self.reaching = self.reaching, None
        assert ex is not None
        self.upstream = FakeUpstream(self)
        self.core.upstream_opened(ex, self.upstream)
        return self.take()

    def refused(self, refusal: Refusal) -> list[Action]:
        ex, self.reaching = self.reaching, None
        assert ex is not None
        self.core.reach_refused(ex, refusal)
        return self.take()

    def failed(self, status: int, message: str) -> list[Action]:
        ex, self.reaching = self.reaching, None
        assert ex is not None
        self.core.reach_failed(ex, status, message)
        return self.take()

    def at(self, seconds: float) -> list[Action]:
        """The timer fires `seconds` after the start."""
        self.now = START + seconds
        self.core.timer_fired()
        return self.take()

    def advance(self) -> list[Action]:
        self.core.advance()
        return self.take()

    def client_full(self) -> list[Action]:
        self.core.client_write_paused()
        return self.take()

    def client_drained(self) -> list[Action]:
        self.core.client_write_resumed()
        return self.take()

    def gone(self) -> list[Action]:
        self.core.client_lost()
        return self.take()

    def drained(self) -> list[Action]:
        self.core.drain()
        return self.take()

    def pool(self) -> FakeUpstream:
        """Put one idle connection in the pool for the next request."""
        upstream = FakeUpstream(self)
        self.pooled.append(upstream)
        return upstream

    def token(self, vm_id: str = VM) -> str:
        return self.tokens.issue(vm_id, 300)[0]

    def request(self, method: str = "GET", target: str = "/", headers: str = "", body: bytes = b"") -> bytes:
        """A request for the VM with its token; `headers` are more lines, each ending in CRLF."""
        head = f"{method} {target} HTTP/1.1\r\nHost: {VM}.{DOMAIN}\r\nAuthorization: Bearer {self.token()}\r\n"
        return (head + headers + "\r\n").encode() + body


def forwarded(method: str = "GET", target: str = "/", headers: str = "", body: bytes = b"") -> bytes:
    """The head (and body) the VM receives for `Play.request` with the same arguments."""
    host = f"{VM}.{DOMAIN}"
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{headers}X-Forwarded-For: {CLIENT.decode()}\r\n"
        f"X-Forwarded-Proto: https\r\nX-Forwarded-Host: {host}\r\n\r\n"
    )
    return head.encode() + body


def ok(body: bytes = b"hi", headers: str = "") -> bytes:
    """A complete keep-alive 200 answer from the VM."""
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


@dataclass(frozen=True)
class Answer:
    """Matches the edge's own answer (bytes) by status, whether it closes, and a part of it."""

    status: int
    closes: bool | None = None
    has: bytes = b""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, bytes):
            return NotImplemented
        if not other.startswith(f"HTTP/1.1 {self.status} ".encode()):
            return False
        if self.closes is not None and (b"\r\nConnection: close\r\n" in other) != self.closes:
            return False
        return self.has in other

    def __hash__(self) -> int:
        return hash((self.status, self.closes, self.has))
