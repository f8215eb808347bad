"""Playbooks of the connection core: request smuggling refused, and the limits on hostile clients
(head size, header fields, slow bodies, idle connections, connections per address)."""

from __future__ import annotations

import pytest

from tests.unit.playbook import Answer, Play, forwarded
from tests.unit.proxy_harness import DOMAIN, VM

HOST = f"Host: {VM}.{DOMAIN}\r\n".encode()


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 1x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : " + VM.encode() + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + HOST + b"X-Folded: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + HOST + b"X-Bare: a\rb\r\n\r\n",
    ],
    ids=["garbage", "te-and-cl", "two-cl", "bad-cl", "space-before-colon", "folded", "bare-cr"],
)
def test_smuggling_attempts_get_400_and_the_connection_ends(raw: bytes) -> None:
    p = Play()
    p.pool()
    actions = p.client(raw)
    assert ("send", Answer(400, closes=True, has=b'"error":"bad_request"')) in actions
    assert not any(a[0] == "upstream" for a in actions), "nothing of it reaches a VM"
    assert actions[-2:] == [("half_close",), ("timer", 5.0)], "what the client still sends is read off, then close"
    assert p.client(p.request()) == [], "nothing after it is parsed"
    assert p.at(5) == [("close",), ("timer", 35.0)]


def test_a_broken_chunk_ends_the_request_and_its_upstream() -> None:
    p = Play()
    p.pool()
    head = p.request("POST", headers="Transfer-Encoding: chunked\r\n")
    assert p.client(head + b"zz\r\n") == [
        ("take_pooled", True),
        ("upstream", forwarded("POST", headers="Transfer-Encoding: chunked\r\n")),
        ("upstream_close",),
        ("send", Answer(400, closes=True, has=b"malformed request")),
        ("half_close",),
        ("timer", 5.0),
    ], "the VM got a head and no body: its connection is closed, never pooled"


def test_a_smuggled_request_behind_a_good_one_never_reaches_the_vm() -> None:
    p = Play()
    p.pool()
    smuggled = b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert p.client(p.request() + smuggled) == [("take_pooled", True), ("upstream", forwarded())]
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert p.upstream_says(answer) == [("send", answer), ("pooled",), ("advance_soon",)]
    assert p.advance() == [
        ("send", Answer(400, closes=True, has=b"Transfer-Encoding can't be present with Content-Length")),
        ("half_close",),
        ("timer", 5.0),
    ], "the smuggled request is answered by the edge, in turn, and the connection ends"


def test_two_host_headers_are_refused_but_the_connection_goes_on() -> None:
    p = Play()
    two_hosts = b"GET / HTTP/1.1\r\n" + HOST + b"Host: vmbeta22." + DOMAIN.encode() + b"\r\n\r\n"
    assert p.client(two_hosts) == [("send", Answer(400, closes=False, has=b"exactly one Host"))]
    p.pool()
    assert p.client(p.request()) == [("take_pooled", True), ("upstream", forwarded())]


def test_connect_is_refused() -> None:
    p = Play()
    actions = p.client(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert actions[0] == ("send", Answer(405, closes=True))


def test_too_many_header_fields_get_431_and_close() -> None:
    p = Play(max_headers=10)
    fields = "".join(f"X-F{i}: v\r\n" for i in range(10))
    actions = p.client(p.request(headers=fields))  # Host + Authorization + 10
    refused = Answer(431, closes=True, has=b"more than 10 header fields")
    assert actions == [("send", refused), ("half_close",), ("timer", 5.0)]


def test_header_fields_up_to_the_limit_pass() -> None:
    p = Play(max_headers=10)
    p.pool()
    fields = "".join(f"X-F{i}: v\r\n" for i in range(8))
    assert p.client(p.request(headers=fields))[0] == ("take_pooled", True)


def test_header_fields_trickling_in_are_counted_before_the_head_ends() -> None:
    p = Play(max_headers=10)
    assert p.client(b"GET / HTTP/1.1\r\n" + HOST) == []
    for i in range(10):
        assert p.client(f"X-F{i}: v\r\n".encode()) == []
    actions = p.client(b"X-F10: v\r\n")  # the head never ends; the 11th field is already one too many
    assert actions == [("send", Answer(431, closes=True)), ("half_close",), ("timer", 5.0)]


def test_an_oversized_head_gets_431() -> None:
    p = Play()
    actions = p.client(b"GET / HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    assert actions[0] == ("send", Answer(431, closes=True, has=b"too large"))


def test_a_head_trickling_in_is_bounded_by_idle_timeout() -> None:
    p = Play(idle_timeout=10)
    assert p.started == [("timer", 10.0)]
    assert p.client(b"GET / HTTP/1.1\r\n") == []
    assert p.at(10) == [("close",), ("timer", 40.0)]


def test_a_body_slower_than_body_timeout_gets_408_and_its_upstream_is_closed() -> None:
    p = Play(body_timeout=3, idle_timeout=60)
    p.pool()
    head = p.request("POST", headers="Content-Length: 100\r\n")
    assert p.client(head) == [
        ("timer", 3.0),
        ("take_pooled", True),
        ("upstream", forwarded("POST", headers="Content-Length: 100\r\n")),
    ]
    assert p.client(b"x" * 10) == [("upstream", b"x" * 10)]
    actions = p.at(3)
    assert actions[:2] == [("upstream_close",), ("send", Answer(408, closes=True, has=b"longer than 3s"))]
    assert p.ctx.metrics.registry.get_sample_value("mvm_slow_clients_total") == 1


def test_a_body_below_body_min_rate_gets_408_after_the_grace() -> None:
    p = Play(body_min_rate=100, body_rate_grace=2, idle_timeout=60)
    p.pool()
    p.client(p.request("POST", headers="Content-Length: 1000\r\n"))
    assert p.client(b"x" * 250) == [("upstream", b"x" * 250)]  # enough for 2.5 s
    assert p.at(2) == [("timer", 2.5)]
    assert p.at(2.5)[1] == ("send", Answer(408, has=b"slower than 100 bytes/s"))


def test_time_the_edge_pauses_reading_is_not_held_against_the_body() -> None:
    p = Play(body_timeout=3, idle_timeout=60)
    p.pool()
    p.client(p.request("POST", headers="Content-Length: 100\r\n"))
    assert p.upstream_full() == [("pause",)], "the upstream takes no more: the client is paused"
    assert p.at(3) == [("timer", 4.0)], "paused by the edge: looked at again later, not refused"
    p.now += 5
    assert p.upstream_drained() == [("resume",)]
    assert p.at(9) == [("timer", 11.0)], "3 s of its own since it could send: 2 s are its own so far"


def test_an_idle_keep_alive_client_is_closed() -> None:
    p = Play(idle_timeout=2)
    assert p.started == [("timer", 2.0)]
    assert p.at(2) == [("close",), ("timer", 32.0)]


def test_connections_past_the_per_address_limit_get_429_without_a_request_read() -> None:
    p = Play(max_connections_per_ip=2, others_open=2)
    assert p.started == [("send", Answer(429, closes=True, has=b"at most 2")), ("half_close",), ("timer", 5.0)]
    assert p.client(p.request()) == [], "its request is read off, never answered"
    assert p.ctx.per_ip == {b"203.0.113.9": 2}, "not counted"


def test_a_trusted_proxy_is_exempt_from_the_per_address_limit() -> None:
    import ipaddress

    p = Play(max_connections_per_ip=2, others_open=2, trusted_proxies=(ipaddress.ip_network("203.0.113.0/24"),))
    assert p.started == [("timer", 75.0)]
    assert p.ctx.per_ip == {b"203.0.113.9": 3}
