"""Rewriting request heads: what the VM receives."""

from __future__ import annotations

from edge.errors_http import error_response
from edge.reqhead import RequestHead


def _head(*headers: tuple[bytes, bytes]) -> RequestHead:
    head = RequestHead()
    for name, value in headers:
        head.add(name, value)
    return head


def _render(head: RequestHead, **kw: object) -> bytes:
    args: dict = {
        "keep_authorization": False,
        "cookie": head.cookie,
        "upgrade": False,
        "client": b"198.51.100.1",
        "proto": b"https",
    }
    args.update(kw)
    return head.render(b"GET", b"/p?q=1", b"1.1", **args)


def test_plain_headers_pass_and_forwarded_headers_are_set() -> None:
    head = _head((b"Host", b"vm.example"), (b"Accept", b"*/*"), (b"X-Forwarded-Proto", b"http"))
    assert _render(head) == (
        b"GET /p?q=1 HTTP/1.1\r\nHost: vm.example\r\nAccept: */*\r\n"
        b"X-Forwarded-For: 198.51.100.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: vm.example\r\n\r\n"
    )


def test_headers_named_by_connection_are_dropped_but_not_framing() -> None:
    head = _head(
        (b"Host", b"h"),
        (b"Connection", b"close, X-A"),
        (b"connection", b"Content-Length"),
        (b"x-a", b"1"),
        (b"X-B", b"2"),
        (b"Content-Length", b"3"),
    )
    out = _render(head)
    assert b"x-a" not in out.lower() and b"X-B: 2\r\n" in out and b"Content-Length: 3\r\n" in out
    assert b"connection" not in out.lower()


def test_upgrade_keeps_connection_upgrade() -> None:
    head = _head((b"Host", b"h"), (b"Connection", b"keep-alive, Upgrade"), (b"Upgrade", b"websocket"))
    out = _render(head, upgrade=True)
    assert b"Connection: Upgrade\r\nUpgrade: websocket\r\n" in out
    assert b"Upgrade" not in _render(head)


def test_token_carriers_and_forwarded_for_chain() -> None:
    head = _head((b"Host", b"h"), (b"Authorization", b"Bearer t"), (b"X-Forwarded-For", b"10.0.0.1"))
    assert b"Authorization" not in _render(head)
    assert b"Authorization: Bearer t\r\n" in _render(head, keep_authorization=True)
    # the edge is the outermost proxy: a client's own X-Forwarded-For is replaced, a trusted proxy's kept
    assert b"X-Forwarded-For: 198.51.100.1\r\n" in _render(head)
    assert b"X-Forwarded-For: 10.0.0.1, 198.51.100.1\r\n" in _render(head, trust_forwarded=True)
    assert b"Cookie" not in _render(head, cookie=None)


def test_client_claims_about_addresses_are_dropped_and_referer_loses_the_token() -> None:
    head = _head((b"Host", b"h"), (b"Forwarded", b"for=1.2.3.4"), (b"X-Real-IP", b"1.2.3.4"),
                 (b"Referer", b"https://v.example/page?a=1&token=SECRET&b=2"))  # fmt: skip
    out = _render(head)
    assert b"Forwarded:" not in out and b"X-Real-IP" not in out and b"1.2.3.4" not in out
    assert b"Referer: https://v.example/page?a=1&b=2\r\n" in out and b"SECRET" not in out


def test_framing_facts() -> None:
    assert _head((b"Transfer-Encoding", b"gzip, chunked")).chunked
    assert _head((b"Content-Length", b"5")).has_body
    assert not _head((b"Content-Length", b"0")).has_body
    assert not _head().has_body
    assert b"Connection: keep-alive\r\n" in _head((b"Host", b"h")).render(
        b"GET", b"/", b"1.0", keep_authorization=False, cookie=None, upgrade=False, client=b"c", proto=b"http"
    )


def test_error_response_is_complete_json() -> None:
    data = error_response(401, "no token", reason="missing", bearer=True, close=False)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"WWW-Authenticate: Bearer" in head and b"Connection: close" not in head
    assert body == b'{"error":"unauthorized","reason":"missing","message":"no token"}'
    assert f"Content-Length: {len(body)}".encode() in head
    assert error_response(503, "x", retry_after=3, body=False).endswith(b"Retry-After: 3\r\nConnection: close\r\n\r\n")
    assert error_response(401, "no token", reason="missing", bearer=True, close=False) is data
