"""Playbooks of the connection core: upgrades to a tunnel, flow control both ways, and answers
that end early or are not HTTP."""

from __future__ import annotations

from edge.connection_state import ConnectionState
from tests.unit.playbook import Answer, Play, forwarded, ok
from tests.unit.proxy_harness import DOMAIN, OTHER_VM, VM

UPGRADE = "Connection: Upgrade\r\nUpgrade: websocket\r\n"
# The rendered head keeps the Upgrade for the VM and puts its own Connection line.
FORWARDED_UPGRADE = "Connection: Upgrade\r\nUpgrade: websocket\r\n"
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def _upgrade_request(p: Play) -> bytes:
    return f"GET /ws HTTP/1.1\r\nHost: {VM}.{DOMAIN}\r\nAuthorization: Bearer {p.token()}\r\n{UPGRADE}\r\n".encode()


def _forwarded_upgrade() -> bytes:
    host = f"{VM}.{DOMAIN}"
    return (
        f"GET /ws HTTP/1.1\r\nHost: {host}\r\n{FORWARDED_UPGRADE}X-Forwarded-For: 203.0.113.9\r\n"
        f"X-Forwarded-Proto: https\r\nX-Forwarded-Host: {host}\r\n\r\n"
    ).encode()


def test_a_101_turns_the_connection_into_a_tunnel_both_ways() -> None:
    p = Play()
    p.pool()
    early = b"\x81\x05hello"  # a frame the client sent before the 101
    assert p.client(_upgrade_request(p) + early) == [("take_pooled", True), ("upstream", _forwarded_upgrade())]
    assert p.core.state is ConnectionState.UPGRADING
    assert p.upstream_says(SWITCHING + b"\x81\x02hi") == [
        ("send", SWITCHING + b"\x81\x02hi"),
        ("upstream", early),
    ], "the bytes kept since the request go up once the tunnel stands"
    assert p.core.state is ConnectionState.TUNNEL
    assert p.client(b"\x81\x03abc") == [("upstream", b"\x81\x03abc")]
    assert p.upstream_says(b"\x81\x03xyz") == [("send", b"\x81\x03xyz")]
    assert p.ctx.open_streams == {VM: 1}, "an open tunnel keeps its VM awake"
    assert p.upstream_gone() == [("close",), ("timer", 30.0)]
    assert p.ctx.open_streams == {}


def test_a_101_after_a_query_token_carries_the_cookie_and_the_bytes_behind_it() -> None:
    p = Play()
    p.pool()
    request = _upgrade_request(p).replace(b"GET /ws ", f"GET /ws?token={p.token()} ".encode())
    p.client(request.replace(b"Authorization", b"X-Not-Authorization"))
    sent = p.upstream_says(SWITCHING + b"\x81\x02hi")
    assert sent[0][1].startswith(b"HTTP/1.1 101 Switching Protocols\r\nSet-Cookie: mvm_token=")
    assert sent[1:] == [("send", b"\x81\x02hi")]
    assert p.core.state is ConnectionState.TUNNEL


def test_an_upgrade_the_vm_refuses_ends_the_connection_after_the_answer() -> None:
    p = Play()
    p.pool()
    p.client(_upgrade_request(p))
    refused = ok(b"no")
    assert p.upstream_says(refused) == [("send", refused), ("pooled",), ("close",), ("timer", 30.0)]


def test_an_upgrade_without_a_token_is_refused_and_closed() -> None:
    p = Play()
    request = f"GET /ws HTTP/1.1\r\nHost: {VM}.{DOMAIN}\r\n{UPGRADE}\r\n".encode()
    assert p.client(request) == [("send", Answer(401, closes=True)), ("close",), ("timer", 30.0)]


def test_a_101_to_a_request_that_asked_for_no_upgrade_is_502() -> None:
    p = Play()
    p.pool()
    p.client(p.request())
    assert p.upstream_says(SWITCHING) == [("send", SWITCHING), ("upstream_close",), ("close",), ("timer", 30.0)]
    assert p.core.state is ConnectionState.CLOSING


def test_an_invalid_answer_is_502() -> None:
    p = Play()
    p.pool()
    p.client(p.request())
    assert p.upstream_says(b"NOT HTTP\r\n\r\n") == [
        ("upstream_close",),
        ("send", Answer(502, has=b"sent an invalid HTTP response")),
    ]


def test_an_answer_cut_short_closes_the_client() -> None:
    p = Play()
    p.pool()
    p.client(p.request())
    part = ok(b"x" * 100)[:60]
    assert p.upstream_says(part) == [("send", part)]
    assert p.upstream_gone() == [("close",), ("timer", 30.0)], "the client learns of it from the close"


def test_an_answer_that_ends_at_close_is_relayed_whole() -> None:
    p = Play()
    p.pool()
    p.client(p.request())
    assert p.upstream_says(b"HTTP/1.1 200 OK\r\n\r\nall of it") == [("send", b"HTTP/1.1 200 OK\r\n\r\nall of it")]
    assert p.upstream_gone() == [("close",), ("timer", 30.0)]


def test_a_client_that_reads_slowly_pauses_the_upstream() -> None:
    p = Play()
    p.pool()
    p.client(p.request())
    assert p.client_full() == [("upstream_pause",)]
    assert p.client_drained() == [("upstream_resume",)]


def test_a_client_already_behind_pauses_the_next_upstream_at_once() -> None:
    p = Play()
    p.client_full()
    p.pool()
    assert p.client(p.request()) == [("take_pooled", True), ("upstream_pause",), ("upstream", forwarded())]


def test_an_upstream_that_takes_no_more_pauses_reading_the_client() -> None:
    p = Play()
    p.pool()
    headers = "Content-Length: 100\r\n"
    p.client(p.request("POST", headers=headers))
    assert p.upstream_full() == [("pause",)]
    assert p.upstream_full() == [], "paused once, whatever the reasons"
    assert p.upstream_drained() == [("resume",)]


def test_a_keep_alive_clients_requests_report_activity_about_once_a_second() -> None:
    p = Play()
    p.backend.add_vm(OTHER_VM, 0)
    for step in (0.0, 0.5, 0.6):
        p.now += step
        p.pool()
        p.client(p.request())
        assert p.upstream_says(ok()) == [("send", ok()), ("pooled",)]
    assert p.backend.touches[VM] == 2, "at 0 s and 1.1 s, not at 0.5 s"
    other = f"GET / HTTP/1.1\r\nHost: {OTHER_VM}.{DOMAIN}\r\nAuthorization: Bearer {p.token(OTHER_VM)}\r\n\r\n"
    p.pool()
    p.client(other.encode())
    assert p.backend.touches[OTHER_VM] == 1, "another VM's request counts at once"


def test_bytes_moved_on_a_long_stream_report_activity_about_once_a_second() -> None:
    p = Play()
    p.pool()
    p.client(p.request())
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    p.upstream_says(head)
    assert p.backend.touches[VM] == 1
    p.now += 0.5
    p.upstream_says(b"3\r\nabc\r\n")
    assert p.backend.touches[VM] == 1
    p.now += 0.6
    p.upstream_says(b"3\r\nabc\r\n")
    assert p.backend.touches[VM] == 2
    sample = p.ctx.metrics.registry.get_sample_value
    assert (sample("mvm_proxied_bytes_total", {"direction": "down"}) or 0) > 0
