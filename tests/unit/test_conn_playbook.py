"""Playbooks of the connection core: requests, pooling, pipelining, closing and drain.

Each test is a list of events (bytes from the client, an answer from the upstream, a timer)
with the actions the core asks for after each; no socket, no sleep.
"""

from __future__ import annotations

from edge.admission import Refusal
from tests.unit.playbook import Answer, Play, forwarded, ok
from tests.unit.proxy_harness import DOMAIN, VM
from vmm.model import VmState


def test_a_request_goes_on_a_pooled_connection_which_goes_back_after_the_answer() -> None:
    p = Play()
    assert p.started == [("timer", 75.0)], "idle_timeout from the start"
    p.pool()
    assert p.client(p.request()) == [("take_pooled", True), ("upstream", forwarded())]
    assert p.ctx.open_streams == {VM: 1} and p.backend.touches[VM] == 1
    assert p.upstream_says(ok()) == [("send", ok()), ("pooled",)]
    assert p.ctx.open_streams == {}
    assert p.at(75) == [("close",), ("timer", 105.0)], "idle: closed, aborted 30 s later if it does not go"
    assert p.at(105) == [("abort",)]
    assert p.gone() == [("cancel_timer",)]
    assert p.ctx.per_ip == {} and p.ctx.clients == set()


def test_without_a_pooled_connection_the_upstream_is_reached() -> None:
    p = Play()
    assert p.client(p.request()) == [("take_pooled", False), ("reach", VM)]
    assert p.opened() == [("upstream", forwarded())]
    assert p.upstream_says(ok()) == [("send", ok()), ("pooled",)]


def test_an_answer_in_pieces_is_relayed_as_it_comes() -> None:
    p = Play()
    p.pool()
    p.client(p.request())
    answer = ok(b"x" * 100)
    assert p.upstream_says(answer[:10]) == [("send", answer[:10])]
    assert p.upstream_says(answer[10:60]) == [("send", answer[10:60])]
    assert p.upstream_says(answer[60:]) == [("send", answer[60:]), ("pooled",)]


def test_a_refused_request_is_answered_by_the_edge_and_the_connection_goes_on() -> None:
    p = Play()
    no_token = f"GET / HTTP/1.1\r\nHost: {VM}.{DOMAIN}\r\n\r\n".encode()
    assert p.client(no_token) == [("send", Answer(401, closes=False, has=b"WWW-Authenticate: Bearer"))]
    p.pool()
    assert p.client(p.request()) == [("take_pooled", True), ("upstream", forwarded())]


def test_pipelined_requests_are_answered_one_at_a_time_in_order() -> None:
    p = Play()
    p.pool()
    p.pool()
    both = p.request(target="/1") + p.request(target="/2")
    assert p.client(both) == [("take_pooled", True), ("upstream", forwarded(target="/1")), ("pause",)]
    assert p.upstream_says(ok(b"1")) == [("send", ok(b"1")), ("pooled",), ("advance_soon",)]
    assert p.advance() == [("resume",), ("take_pooled", True), ("upstream", forwarded(target="/2"))]
    assert p.upstream_says(ok(b"2")) == [("send", ok(b"2")), ("pooled",)]


def test_connection_close_from_the_client_closes_after_the_answer() -> None:
    p = Play()
    p.pool()
    p.client(p.request(headers="Connection: close\r\n"))
    assert p.upstream_says(ok()) == [("send", ok()), ("pooled",), ("close",), ("timer", 30.0)]


def test_an_upstream_that_closes_after_its_answer_is_not_pooled() -> None:
    p = Play()
    p.pool()
    p.client(p.request())
    answer = ok(headers="Connection: close\r\n")
    assert p.upstream_says(answer) == [("send", answer), ("upstream_close",), ("close",), ("timer", 30.0)]


def test_more_than_was_asked_for_ends_both_connections() -> None:
    p = Play()
    p.pool()
    p.client(p.request())
    extra = ok() + ok()
    assert p.upstream_says(extra) == [("send", extra), ("upstream_close",), ("close",), ("timer", 30.0)]


def test_a_head_answer_ends_at_its_head_and_its_connection_is_not_reused() -> None:
    p = Play()
    p.pool()
    p.client(p.request("HEAD"))
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    assert p.upstream_says(head[:20]) == [], "held until the head is whole"
    assert p.upstream_says(head[20:]) == [("send", head), ("upstream_close",)]


def test_a_query_token_becomes_a_cookie_on_the_answer() -> None:
    p = Play()
    p.pool()
    token = p.token()
    request = f"GET /page?token={token}&a=1 HTTP/1.1\r\nHost: {VM}.{DOMAIN}\r\n\r\n".encode()
    assert p.client(request) == [("take_pooled", True), ("upstream", forwarded(target="/page?a=1"))]
    ((what, head), body, pooled) = p.upstream_says(ok())
    assert what == "send" and body == ("send", b"hi") and pooled == ("pooled",)
    assert head.startswith(b"HTTP/1.1 200 OK\r\nSet-Cookie: mvm_token=" + token.encode())
    assert head.endswith(b"\r\nContent-Length: 2\r\n\r\n")


def test_an_interim_100_continue_goes_through_before_the_answer() -> None:
    p = Play()
    p.pool()
    head = p.request("POST", headers="Content-Length: 4\r\nExpect: 100-continue\r\n")
    assert p.client(head) == [
        ("take_pooled", True),
        ("upstream", forwarded("POST", headers="Content-Length: 4\r\nExpect: 100-continue\r\n")),
    ]
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    assert p.upstream_says(interim) == [("send", interim)]
    assert p.client(b"body") == [("upstream", b"body")]
    assert p.upstream_says(ok()) == [("send", ok()), ("pooled",)]
    assert p.ctx.metrics.registry.get_sample_value("mvm_requests_total", {"status": "200"}) == 1


def test_a_chunked_body_is_forwarded_chunk_by_chunk() -> None:
    p = Play()
    p.pool()
    head = p.request("POST", headers="Transfer-Encoding: chunked\r\n")
    assert p.client(head) == [
        ("take_pooled", True),
        ("upstream", forwarded("POST", headers="Transfer-Encoding: chunked\r\n")),
    ]
    assert p.client(b"5\r\nhello\r\n") == [("upstream", b"5\r\nhello\r\n")]
    assert p.client(b"6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n") == [
        ("upstream", b"6\r\n world\r\n"),
        ("upstream", b"0\r\n\r\n"),
    ], "re-chunked: extensions and trailers stay here"


def test_the_client_leaving_mid_answer_closes_the_upstream() -> None:
    p = Play()
    p.pool()
    p.client(p.request())
    assert p.upstream_says(ok(b"x" * 10)[:30]) != []
    assert p.gone() == [("upstream_close",), ("cancel_timer",)]
    assert p.ctx.open_streams == {} and p.ctx.per_ip == {}


def test_drain_closes_a_connection_between_requests_at_once() -> None:
    p = Play()
    assert p.drained() == [("close",), ("timer", 30.0)]


def test_drain_answers_what_was_received_then_closes() -> None:
    p = Play()
    p.pool()
    p.pool()
    p.client(p.request(target="/1") + p.request(target="/2"))
    assert p.drained() == []
    assert p.upstream_says(ok(b"1")) == [("send", ok(b"1")), ("pooled",), ("advance_soon",)]
    assert p.advance() == [("resume",), ("take_pooled", True), ("upstream", forwarded(target="/2"))]
    assert p.upstream_says(ok(b"2")) == [("send", ok(b"2")), ("pooled",), ("close",), ("timer", 30.0)]


def test_drain_while_a_head_arrives_answers_it_with_close() -> None:
    p = Play()
    request = p.request()
    assert p.client(request[:20]) == []
    assert p.drained() == [], "a head is arriving: it is answered first"
    p.pool()
    p.client(request[20:])
    answer = ok()
    assert p.upstream_says(answer) == [("send", answer), ("pooled",), ("close",), ("timer", 30.0)]


def test_the_same_head_again_is_admitted_again_while_its_token_lives_and_its_vm_exists() -> None:
    p = Play()
    request = p.request()
    for _ in range(2):
        p.pool()
        assert p.client(request) == [("take_pooled", True), ("upstream", forwarded())]
        p.upstream_says(ok())
    p.backend.vms[VM].state = VmState.SUSPENDED
    assert p.client(request) == [("reach", VM)], "its VM's state is looked at each time"
    p.refused(Refusal(503, "asleep"))
    p.now += 400  # past the token's 300 s
    assert p.client(request) == [("send", Answer(401, has=b'"reason":"expired"'))]
    del p.backend.vms[VM]
    p.now -= 400
    assert p.client(request) == [("send", Answer(404))]
