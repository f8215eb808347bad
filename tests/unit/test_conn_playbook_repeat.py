"""Playbooks of the same bytes again on a keep-alive connection (wrk, a health check, a poller).

A client's request read that is the last one again is admitted from the verdict the connection
kept, without llhttp or admission, with the outcome a parse would have: token life and the VM's
record are looked at again each time, and anything but exactly one bodiless request is parsed as
ever. An upstream's answer that is its last whole answer again ends the exchange unparsed."""

from __future__ import annotations

from typing import Any

import pytest

from edge.admission import Admission, Refusal
from edge.reqhead import RequestHead
from edge.upstream import REPEAT_MAX
from tests.unit.playbook import Answer, Play, forwarded, ok
from tests.unit.proxy_harness import DOMAIN, VM
from vmm.model import VmState


def _admitted_once(**settings: Any) -> tuple[Play, bytes]:
    """A connection that has had one request (a fixed token) answered on a pooled connection."""
    p = Play(**settings)
    token = p.token()
    request = f"GET /poll HTTP/1.1\r\nHost: {VM}.{DOMAIN}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    p.pool()
    assert p.client(request) == [("take_pooled", True), ("upstream", forwarded(target="/poll"))]
    assert p.upstream_says(ok()) == [("send", ok()), ("pooled",)]
    return p, request


def _no_parsing(p: Play, monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on admitting a head from its parse fails the test: only the kept verdict may answer."""

    def parsed(method: bytes, target: bytes, version: str, head: RequestHead, upgrade: bool) -> Admission | Refusal:
        raise AssertionError("the head was parsed and admitted again")

    monkeypatch.setattr(p.core._admitter, "admit", parsed)


def test_the_same_bytes_again_are_forwarded_from_the_kept_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    p, request = _admitted_once()
    _no_parsing(p, monkeypatch)
    for _ in range(3):
        p.pool()
        assert p.client(request) == [("take_pooled", True), ("upstream", forwarded(target="/poll"))]
        assert p.ctx.open_streams == {VM: 1}
        assert p.upstream_says(ok()) == [("send", ok()), ("pooled",)]
        assert p.ctx.open_streams == {}
    assert p.backend.touches[VM] == 1, "activity is recorded once a second"


def test_a_repeat_sent_before_the_answer_waits_its_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    p, request = _admitted_once()
    _no_parsing(p, monkeypatch)
    p.pool()
    p.pool()
    assert p.client(request) == [("take_pooled", True), ("upstream", forwarded(target="/poll"))]
    assert p.client(request) == [("pause",)]
    assert p.upstream_says(ok(b"1")) == [("send", ok(b"1")), ("pooled",), ("advance_soon",)]
    assert p.advance() == [("resume",), ("take_pooled", True), ("upstream", forwarded(target="/poll"))]
    assert p.upstream_says(ok(b"2")) == [("send", ok(b"2")), ("pooled",)]


def test_a_token_that_expired_since_is_refused_as_a_parse_would() -> None:
    p, request = _admitted_once()
    p.now += 301  # the token's 300 s are over
    assert p.client(request) == [("send", Answer(401, closes=False, has=b"WWW-Authenticate: Bearer"))]


def test_a_vm_gone_since_is_404() -> None:
    p, request = _admitted_once()
    del p.backend.vms[VM]
    assert p.client(request) == [("send", Answer(404, closes=False))]


def test_a_vm_suspended_since_is_woken(monkeypatch: pytest.MonkeyPatch) -> None:
    p, request = _admitted_once()
    _no_parsing(p, monkeypatch)
    p.backend.vms[VM].state = VmState.SUSPENDED
    assert p.client(request) == [("reach", VM)]
    assert p.waiting() == [] and p.woken() == []
    assert p.opened() == [("upstream", forwarded(target="/poll"))]


def test_a_port_that_became_h2c_only_is_refused_as_a_parse_would() -> None:
    p, request = _admitted_once()
    rec = p.backend.vms[VM]
    rec.h2c_ports = (rec.app_port,)
    assert p.client(request) == [("send", Answer(502, has=b"speaks HTTP/2 only"))]


def test_a_request_with_a_body_is_parsed_each_time() -> None:
    p = Play()
    request = p.request("POST", "/form", "Content-Length: 3\r\n", b"abc")
    for _ in range(2):
        p.pool()
        head = forwarded("POST", "/form", "Content-Length: 3\r\n")
        assert p.client(request) == [("take_pooled", True), ("upstream", head), ("upstream", b"abc")]
        assert p.upstream_says(ok()) == [("send", ok()), ("pooled",)]


def test_two_requests_in_one_read_are_not_kept_as_one() -> None:
    p, request = _admitted_once()
    p.pool()
    p.pool()
    assert p.client(request + request) == [
        ("take_pooled", True), ("upstream", forwarded(target="/poll")), ("pause",)
    ]  # fmt: skip
    assert p.core._repeat_read is None


def _answered_once(p: Play) -> tuple[bytes, object]:
    """One request answered on a pooled connection that goes back to the pool for the next."""
    upstream = p.pool()
    request = p.request()
    p.client(request)
    assert p.upstream_says(ok()) == [("send", ok()), ("pooled",)]
    p.pooled.append(upstream)
    return request, upstream


def test_the_last_answer_again_ends_the_exchange_unparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    p = Play()
    _, upstream = _answered_once(p)

    def parsed(data: bytes) -> None:
        raise AssertionError("the answer was parsed again")

    monkeypatch.setattr(p.upstream.tracker, "parser", type("Parser", (), {"feed_data": staticmethod(parsed)})())
    for _ in range(2):
        p.client(p.request())
        assert p.upstream_says(ok()) == [("send", ok()), ("pooled",)]
        p.pooled.append(upstream)
    assert p.ctx.open_streams == {}


def test_another_answer_after_a_kept_one_is_parsed() -> None:
    p = Play()
    _answered_once(p)
    p.client(p.request())
    longer = ok(b"a longer answer")
    assert p.upstream_says(longer[:30]) == [("send", longer[:30])]
    assert p.upstream_says(longer[30:]) == [("send", longer[30:]), ("pooled",)]


def test_the_kept_answer_to_a_head_request_still_ends_at_its_head() -> None:
    p = Play()
    _answered_once(p)
    p.client(p.request("HEAD"))
    head = ok()[: -len(b"hi")]
    closed = [("send", head), ("upstream_close",), ("close",), ("timer", 30.0)]
    assert p.upstream_says(ok()) == closed, "the body is more than was asked for: both connections end"


def test_an_answer_in_pieces_or_a_big_one_is_not_kept() -> None:
    p = Play()
    upstream = p.pool()
    p.client(p.request())
    p.upstream_says(ok()[:5])
    p.upstream_says(ok()[5:])
    assert upstream.tracker.repeat is None
    p.pooled.append(upstream)
    big = ok(b"x" * REPEAT_MAX)
    p.client(p.request())
    assert p.upstream_says(big) == [("send", big), ("pooled",)]
    assert upstream.tracker.repeat is None
