"""One request and its answer on a client connection, as two small state machines: state
only, no I/O (waking a VM and connecting are edge.reach's, deciding is edge.connection_core's).

The answer side (`ExchangeState`) goes, for a request that reaches a VM (or the control API):

    RECEIVED -> ADMITTED -> CONNECTING -> FORWARDED -> STREAMING -> ANSWERED -> FINISHED

skipping CONNECTING when an idle pooled connection is at hand, and passing CONNECTING ->
WAITING_FOR_VM -> CONNECTING when its VM sleeps. One the edge answers itself goes RECEIVED ->
REFUSED -> ANSWERED -> FINISHED. Any state before STREAMING can end in ANSWERED with the
edge's own error; a request sent on a pooled connection that closed before answering goes
FORWARDED -> CONNECTING once. After a 101 the exchange stays STREAMING: the connection has
become a tunnel (`edge.connection_state.ConnectionState.TUNNEL`).

The request side (`BodyState`) runs beside it, since a body may still arrive while the answer
streams: ARRIVING -> DONE, or ARRIVING -> DISCARDING -> DONE once the body is no longer wanted.

Moves go through `move` (checked against a table) and `drop_body` / `end_body`, which refuse
a move that is not allowed by raising `IllegalMove` (a bug in the edge; the event loop logs
it and closes the client). The states are IntEnums so that the table lookups hash at C speed.
"""

from __future__ import annotations

import enum

from .admission import Admission, Refusal
from .proxy_context import ProxySettings


class IllegalMove(RuntimeError):
    """A state change its machine does not allow."""


class ExchangeState(enum.IntEnum):
    """How far the answer to one request has come."""

    RECEIVED = enum.auto()  # its head is parsed; admission decides next
    REFUSED = enum.auto()  # the edge answers it itself, when its turn comes
    ADMITTED = enum.auto()  # to be forwarded, when its turn comes
    WAITING_FOR_VM = enum.auto()  # held until its VM is running (within the per-VM bound)
    CONNECTING = enum.auto()  # a new upstream connection is being opened (a task runs)
    FORWARDED = enum.auto()  # the head (and the body so far) went upstream; nothing answered yet
    STREAMING = enum.auto()  # bytes of the upstream's answer went to the client
    ANSWERED = enum.auto()  # the whole answer was sent; the request may still be arriving
    FINISHED = enum.auto()  # request and answer are over; the connection went on


class BodyState(enum.IntEnum):
    """Where the request's own bytes stand."""

    ARRIVING = enum.auto()  # still parsing: body bytes go upstream, or into `body` until attached
    DISCARDING = enum.auto()  # answered or refused already: the rest of the body is read and dropped
    DONE = enum.auto()  # the whole request was read


_E = ExchangeState
# A queued request is refused (again) when the request stream breaks behind it.
_EXCHANGE_MOVES: dict[ExchangeState, frozenset[ExchangeState]] = {
    _E.RECEIVED: frozenset((_E.REFUSED, _E.ADMITTED)),
    _E.REFUSED: frozenset((_E.REFUSED, _E.ANSWERED)),
    _E.ADMITTED: frozenset((_E.REFUSED, _E.CONNECTING, _E.FORWARDED, _E.ANSWERED)),
    _E.WAITING_FOR_VM: frozenset((_E.CONNECTING, _E.ANSWERED)),
    _E.CONNECTING: frozenset((_E.WAITING_FOR_VM, _E.FORWARDED, _E.ANSWERED)),
    _E.FORWARDED: frozenset((_E.CONNECTING, _E.STREAMING, _E.ANSWERED)),
    _E.STREAMING: frozenset((_E.ANSWERED,)),
    _E.ANSWERED: frozenset((_E.FINISHED,)),
    _E.FINISHED: frozenset(),
}
# Methods a guest may be asked twice: a request whose head may have reached the guest is sent
# again only with one of these, and only when its connection was fresh (see retryable).
_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"PUT", b"TRACE"))
_STARTED = frozenset((_E.STREAMING, _E.ANSWERED, _E.FINISHED))
# Members as module names: a lookup on the enum class costs ~0.1 µs on 3.11.
_RECEIVED = _E.RECEIVED
_REFUSED = _E.REFUSED
_ADMITTED = _E.ADMITTED
_ARRIVING = BodyState.ARRIVING
_DISCARDING = BodyState.DISCARDING
_DONE = BodyState.DONE


class Exchange:
    """One request and its answer: what admission decided, how far both sides have come."""

    __slots__ = (
        "body",
        "body_at",
        "body_paused",
        "body_start",
        "body_state",
        "buffered",
        "chunked",
        "cookie",
        "generation",
        "has_body",
        "head",
        "is_head",
        "keep_alive",
        "method",
        "port",
        "received",
        "reconnected",
        "refusal",
        "resent",
        "reused",
        "state",
        "status",
        "upgrade",
        "vm_id",
        "vm_was_running",
    )

    def __init__(self, method: bytes, keep_alive: bool, has_body: bool, chunked: bool, upgrade: bool) -> None:
        self.state = _RECEIVED
        self.body_state = _ARRIVING
        self.method = method
        self.is_head = method == b"HEAD"
        # An Upgrade the VM refuses leaves the connection's framing unknown: close after it.
        self.keep_alive = keep_alive and not upgrade
        self.has_body = has_body
        self.chunked = chunked
        self.upgrade = upgrade
        self.vm_id: str | None = None  # None: the control API (or nowhere, when refused)
        self.port = 0
        self.vm_was_running = True  # when admitted: an idle pooled connection is tried first
        self.head = b""
        self.cookie: bytes | None = None  # a Set-Cookie line for the response head
        self.refusal: Refusal | None = None  # why the edge answers itself
        self.body: list[bytes] | None = []  # body bytes read before an upstream is attached
        self.buffered = 0
        self.received = 0  # request body bytes so far, for body_min_rate
        self.body_at = 0.0  # last time body bytes arrived (or the edge let the client send again)
        self.body_start = 0.0  # when reading the body started, as this exchange's turn came
        self.body_paused = 0.0  # the connection's paused time then: time the edge paused is not the client's
        self.status = 0
        self.reused = False  # the upstream connection came from the pool
        self.generation = 0  # the VM's generation when admitted (pooled connections must match)
        self.reconnected = False  # a connect failed and the VM's owner was asked: no second time
        self.resent = False  # the head was sent again after a connection ended unanswered: no second time

    def move(self, new: ExchangeState) -> None:
        if new not in _EXCHANGE_MOVES[self.state]:
            raise IllegalMove(f"exchange {self.state.name} -> {new.name}")
        self.state = new

    def admit(self, verdict: Admission) -> None:
        self.move(_ADMITTED)
        self.head = verdict.head
        self.vm_id = verdict.vm_id
        self.port = verdict.port
        self.vm_was_running = verdict.running
        self.cookie = verdict.set_cookie
        self.generation = verdict.generation

    def refuse(self, refusal: Refusal) -> None:
        self.move(_REFUSED)
        self.refusal = refusal
        self.drop_body()

    def drop_body(self) -> None:
        """ARRIVING -> DISCARDING: the body is not wanted (the request is answered or refused),
        the rest is read off. Once the whole request was read there is nothing left to drop."""
        self.body = None
        if self.body_state is _ARRIVING:
            self.body_state = _DISCARDING

    def end_body(self) -> bool:
        """ARRIVING or DISCARDING -> DONE: the whole request was read. True when its end is
        still to be forwarded (it was not being discarded)."""
        old = self.body_state
        if old is _DONE:
            raise IllegalMove("request body DONE -> DONE")
        self.body_state = _DONE
        return old is _ARRIVING

    @property
    def answer_started(self) -> bool:
        """Bytes of an answer went to the client: an error can no longer be sent instead."""
        return self.state in _STARTED

    def retryable(self) -> bool:
        """The connection ended after the head went out and before any answer: the guest may
        have run the request. Sent again only when that is harmless (an idempotent method, no
        body) and the connection was fresh. A pooled one is never retried: it was checked
        just before (UpstreamConn.established), so its loss is no keep-alive race but a guest
        that may be running the request already, e.g. one restored with it in its buffers."""
        return not self.reused and not self.resent and not self.has_body and self.method in _IDEMPOTENT

    def where(self) -> str:
        return "the control API" if self.vm_id is None else f"port {self.port} of VM {self.vm_id}"

    def body_overdue(self, s: ProxySettings, now: float, paused_for: float) -> tuple[str | None, float]:
        """Why the body being read is overdue (None: it is not), and when to check it next.

        Three limits: bytes must keep coming (idle_timeout), the whole body must arrive within
        body_timeout, and after body_rate_grace it must average body_min_rate bytes/s.
        `paused_for` is the connection's paused time so far: time the edge paused reading is
        not counted against the client.
        """
        due = self.body_at + s.idle_timeout
        if now >= due:
            return f"no request body bytes for {s.idle_timeout:g}s", now
        elapsed = now - self.body_start - (paused_for - self.body_paused)
        if s.body_timeout:
            if elapsed >= s.body_timeout:
                return f"the request body took longer than {s.body_timeout:g}s", now
            due = min(due, now + s.body_timeout - elapsed)
        if s.body_min_rate:
            need = max(s.body_rate_grace, self.received / s.body_min_rate)
            if elapsed >= need:
                return f"the request body came slower than {s.body_min_rate} bytes/s", now
            due = min(due, now + need - elapsed)
        return None, due
