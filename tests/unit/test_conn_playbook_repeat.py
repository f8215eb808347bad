"""Playbooks of a keep-alive client sending the same request bytes again (wrk, a health check, a
poller): the connection core admits them from the verdict it kept, without llhttp or admission,
and with the same outcome as a parse would have: token life and the VM's record are looked at
again each time, and anything else than exactly one bodiless request is parsed as ever."""

from __future__ import annotations

from typing import Any

import pytest

from edge.admission import Admission, Refusal
from edge.reqhead import RequestHead
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
    assert p.backend.touches[VM] == 4


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
