"""Playbooks of the connection core: requests held while their VM wakes, reaching an upstream
and what the edge answers when it cannot, and a request sent again (at most once)."""

from __future__ import annotations

import pytest

from edge.admission import Refusal
from edge.connection_core import HOLD_BUFFER
from edge.exchange import ExchangeState
from tests.unit.playbook import Answer, Play, forwarded, ok
from tests.unit.proxy_harness import VM
from vmm.model import VmState


def test_a_request_for_a_sleeping_vm_is_held_until_it_wakes() -> None:
    p = Play(vm_state=VmState.SUSPENDED)
    assert p.client(p.request()) == [("reach", VM)], "no pooled connection is asked for: it cannot be live"
    ex = p.core.answering
    assert ex is not None and ex.state is ExchangeState.CONNECTING
    assert p.waiting() == [] and ex.state is ExchangeState.WAITING_FOR_VM
    assert p.woken() == [] and ex.state is ExchangeState.CONNECTING
    assert p.opened() == [("upstream", forwarded())]
    assert p.upstream_says(ok()) == [("send", ok()), ("pooled",)]


def test_body_read_while_held_is_sent_with_the_head() -> None:
    p = Play(vm_state=VmState.SUSPENDED)
    headers = "Content-Length: 11\r\n"
    assert p.client(p.request("POST", headers=headers, body=b"hello")) == [("reach", VM)]
    p.waiting()
    assert p.client(b" world") == [], "kept, and reading goes on: a client that leaves is noticed"
    p.woken()
    assert p.opened() == [("upstream", forwarded("POST", headers=headers, body=b"hello world"))]


def test_a_held_body_past_the_hold_buffer_pauses_reading_until_the_upstream_is_there() -> None:
    p = Play(vm_state=VmState.SUSPENDED)
    size = HOLD_BUFFER + 10
    p.client(p.request("POST", headers=f"Content-Length: {size}\r\n"))
    p.waiting()
    assert p.client(b"x" * HOLD_BUFFER) == []
    assert p.client(b"y") == [("pause",)]
    p.woken()
    sent = p.opened()
    assert sent[0][0] == "upstream" and sent[0][1].endswith(b"x" * HOLD_BUFFER + b"y")
    assert sent[1:] == [("resume",)]
    assert p.client(b"z" * 9) == [("upstream", b"z" * 9)], "from now on the body goes straight on"


def test_a_wake_refused_is_answered_and_the_connection_goes_on() -> None:
    p = Play(vm_state=VmState.SUSPENDED)
    p.client(p.request())
    p.waiting()
    refusal = Refusal(503, f"too many requests are waiting for VM {VM} to wake", retry_after=2)
    assert p.refused(refusal) == [("send", Answer(503, closes=False, has=b"Retry-After: 2\r\n"))]
    assert p.ctx.open_streams == {}
    p.backend.vms[VM].state = VmState.RUNNING
    p.pool()
    assert p.client(p.request()) == [("take_pooled", True), ("upstream", forwarded())]


@pytest.mark.parametrize(("status", "retry"), [(503, True), (502, False), (504, False)])
def test_an_upstream_that_cannot_be_reached_gets_the_edges_answer(status: int, retry: bool) -> None:
    p = Play()
    p.client(p.request())
    actions = p.failed(status, "cannot connect")
    assert actions == [("send", Answer(status, closes=False, has=b'"message":"cannot connect"'))]
    assert (b"Retry-After" in actions[0][1]) == retry


def test_the_client_leaving_while_held_stops_the_wait() -> None:
    p = Play(vm_state=VmState.SUSPENDED)
    p.client(p.request())
    p.waiting()
    assert p.gone() == [("cancel_reach",), ("cancel_timer",)]
    assert p.ctx.open_streams == {} and p.ctx.per_ip == {}


def test_an_upstream_opened_after_the_client_left_is_closed() -> None:
    p = Play()
    p.client(p.request())
    ex = p.core.answering
    p.reaching = None  # the task was past the point of being cancelled
    p.gone()
    p.reaching = ex
    assert p.opened() == [("upstream_close",)]


def test_a_pooled_connection_lost_before_answering_is_502_never_sent_again() -> None:
    p = Play()
    p.pool()
    p.client(p.request())
    assert p.upstream_gone() == [("send", Answer(502, has=b"closed the connection without answering"))]


def test_a_get_on_a_new_connection_lost_before_answering_is_sent_again_once() -> None:
    p = Play()
    p.client(p.request())
    p.opened()
    assert p.upstream_gone() == [("reach", VM)]
    assert p.opened() == [("upstream", forwarded())]
    assert p.upstream_gone() == [("send", Answer(502))], "at most once"


def test_a_post_lost_before_answering_is_never_sent_again() -> None:
    p = Play()
    headers = "Content-Length: 1\r\n"
    p.client(p.request("POST", headers=headers, body=b"x"))
    p.opened()
    assert p.upstream_gone() == [("send", Answer(502))]


def test_an_upstream_that_never_answers_gets_504() -> None:
    p = Play(read_timeout=20, idle_timeout=60)
    p.pool()
    assert p.client(p.request()) == [("take_pooled", True), ("upstream", forwarded()), ("timer", 20.0)]
    assert p.at(20) == [
        ("upstream_close",),
        ("send", Answer(504, closes=False, has=b"did not answer within 20s")),
        ("timer", 80.0),
    ], "the request was whole: the connection goes on, idle from now"


def test_a_queued_request_asks_again_whether_its_vm_runs() -> None:
    p = Play()
    p.pool()
    p.client(p.request(target="/1") + p.request(target="/2"))
    p.upstream_says(ok())
    p.backend.vms[VM].state = VmState.SUSPENDED  # fell asleep meanwhile; its pooled connections are gone
    assert p.advance() == [("resume",), ("take_pooled", False), ("reach", VM)]
