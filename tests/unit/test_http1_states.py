"""The exchange's and the client connection's state machines: the states a request goes
through, and that a move their tables do not list is refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from edge.admission import Admission, Refusal
from edge.connection_state import CONNECTION_MOVES, ConnectionState
from edge.exchange import BodyState, Exchange, ExchangeState, IllegalMove
from edge.http1 import EdgeProtocol
from tests.unit.proxy_harness import VM, Edge, FakeBackend, Upstream, start_edge

S = ExchangeState


@pytest.fixture
async def edge(upstream: Upstream) -> AsyncIterator[Edge]:
    backend = FakeBackend()
    backend.add_vm(VM, upstream.port)
    e = await start_edge(backend)
    yield e
    await e.close()


def _admitted(method: bytes = b"GET", has_body: bool = False) -> Exchange:
    ex = Exchange(method, True, has_body, False, False)
    ex.admit(Admission(b"GET / HTTP/1.1\r\n\r\n", VM, 8080, running=False))
    return ex


def test_a_request_for_a_sleeping_vm_goes_through_every_state() -> None:
    ex = _admitted()
    assert (ex.vm_id, ex.port, ex.vm_was_running) == (VM, 8080, False)
    for state in (S.CONNECTING, S.WAITING_FOR_VM, S.CONNECTING, S.FORWARDED):
        ex.move(state)
        assert not ex.answer_started
    ex.move(S.STREAMING)
    assert ex.answer_started
    assert ex.end_body(), "the request's end is still forwarded"
    ex.move(S.ANSWERED)
    ex.move(S.FINISHED)


def test_a_refused_request_reads_its_body_off() -> None:
    ex = Exchange(b"POST", True, True, False, False)
    ex.refuse(Refusal(401, "no token"))
    assert ex.state is S.REFUSED and ex.body_state is BodyState.DISCARDING and ex.body is None
    assert not ex.end_body(), "a discarded body's end is not forwarded"
    ex.move(S.ANSWERED)
    assert ex.answer_started


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ((), S.FORWARDED),  # not admitted yet
        ((S.REFUSED,), S.CONNECTING),  # a refused request never reaches a VM
        ((S.ADMITTED,), S.STREAMING),  # nothing was forwarded
        ((S.ADMITTED, S.FORWARDED, S.STREAMING), S.CONNECTING),  # no retry once the answer started
        ((S.ADMITTED, S.ANSWERED), S.ANSWERED),  # answered twice
        ((S.ADMITTED, S.ANSWERED, S.FINISHED), S.RECEIVED),  # finished is final
    ],
)
def test_illegal_exchange_moves_are_refused(path: tuple[ExchangeState, ...], illegal: ExchangeState) -> None:
    ex = Exchange(b"GET", True, False, False, False)
    for state in path:
        ex.move(state)
    before = ex.state
    with pytest.raises(IllegalMove, match=f"{before.name} -> {illegal.name}"):
        ex.move(illegal)
    assert ex.state is before


def test_a_request_body_ends_once() -> None:
    ex = _admitted(b"PUT", has_body=True)
    assert ex.end_body()
    with pytest.raises(IllegalMove):
        ex.end_body()
    ex.drop_body()  # answered after the whole request was read: nothing is left to read off
    assert ex.body_state is BodyState.DONE and ex.body is None


def test_only_an_idempotent_request_on_a_fresh_connection_is_sent_again_once() -> None:
    ex = _admitted()
    assert ex.retryable(), "a GET whose new connection ended unanswered may go once more"
    ex.resent = True
    assert not ex.retryable(), "at most once"
    pooled = _admitted()
    pooled.reused = True
    assert not pooled.retryable(), "a pooled connection was checked before use: the guest may have run it"
    assert not _admitted(b"POST").retryable()
    assert not _admitted(b"PUT", has_body=True).retryable()


def test_a_connection_only_moves_down_its_list() -> None:
    assert set(CONNECTION_MOVES) == set(ConnectionState)
    for old, moves in CONNECTION_MOVES.items():
        assert all(new > old for new in moves), old
    assert [old for old, moves in CONNECTION_MOVES.items() if ConnectionState.TUNNEL in moves] == [
        ConnectionState.UPGRADING
    ]
    assert not CONNECTION_MOVES[ConnectionState.CLOSED]


async def test_an_illegal_connection_move_is_refused(edge: Edge) -> None:
    proto = EdgeProtocol(edge.ctx, b"https")
    with pytest.raises(IllegalMove, match="OPEN -> TUNNEL"):
        proto.core.move(ConnectionState.TUNNEL)
    proto.core.move(ConnectionState.CLOSING)
    with pytest.raises(IllegalMove, match="CLOSING -> OPEN"):
        proto.core.move(ConnectionState.OPEN)


async def test_a_keep_alive_connection_is_open_between_requests_and_a_tunnel_after_101(edge: Edge) -> None:
    c = await edge.connect()
    auth = f"Authorization: Bearer {edge.token()}"
    assert (await c.get("/echo", edge.host(), {"Authorization": f"Bearer {edge.token()}"})).status == 200
    (proto,) = edge.ctx.clients
    assert isinstance(proto, EdgeProtocol)
    assert proto.core.state is ConnectionState.OPEN and proto.core.answering is None
    await c.send(
        f"GET /ws HTTP/1.1\r\nHost: {edge.host()}\r\n{auth}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
    )
    status, _ = await c.head()
    assert status == 101
    assert proto.core.state is ConnectionState.TUNNEL
    assert proto.core.answering is not None and proto.core.answering.state is S.STREAMING
    c.close()
    for _ in range(500):
        if proto.core.state is ConnectionState.CLOSED:
            break
        await asyncio.sleep(0.01)
    assert proto.core.state is ConnectionState.CLOSED
    assert edge.ctx.open_streams == {}
