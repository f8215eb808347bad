"""Answers the edge writes itself: small JSON bodies with a Content-Length, rendered once.

The same few answers repeat (unknown host, 401 reasons, wake failures), so each distinct
one is built once and its bytes reused.
"""

from __future__ import annotations

from functools import lru_cache
from http import HTTPStatus

import orjson

# The one table of `error` codes, for the proxy's answers and the control API's alike.
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "body_too_large",
    422: "invalid_request",
    429: "too_many_requests",
    431: "headers_too_large",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
    504: "gateway_timeout",
    505: "http_version_not_supported",
    507: "insufficient_capacity",
}


def error_code(status: int) -> str:
    """The JSON `error` code for a status the edge answers with."""
    return _CODES.get(status, "error")


@lru_cache(maxsize=1024)
def error_response(
    status: int,
    message: str,
    *,
    reason: str | None = None,
    close: bool = True,
    retry_after: int | None = None,
    bearer: bool = False,
    body: bool = True,
) -> bytes:
    """A complete HTTP/1.1 answer. `body=False` is for HEAD: same headers, no body."""
    doc: dict[str, str] = {"error": error_code(status)}
    if reason is not None:
        doc["reason"] = reason
    doc["message"] = message
    payload = orjson.dumps(doc)
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        "Cache-Control: no-store",
    ]
    if bearer:
        lines.append("WWW-Authenticate: Bearer")
    if retry_after is not None:
        lines.append(f"Retry-After: {retry_after}")
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + payload if body else head
