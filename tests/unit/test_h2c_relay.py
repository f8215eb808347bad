"""The h2c relay's header translation: an admitted HTTP/1.1 head to HTTP/2 headers, and back."""

from __future__ import annotations

from edge.h2c_relay import request_headers, response_headers


def test_an_admitted_head_becomes_h2_headers_without_connection_headers() -> None:
    head = (
        b"POST /mvm.Demo/Echo HTTP/1.1\r\nHost: vm.example\r\nConnection: keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Type: application/grpc\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n"
    )
    assert request_headers(head) == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/mvm.Demo/Echo"),
        (b":authority", b"vm.example"),
        (b"content-type", b"application/grpc"),
        (b"x-forwarded-for", b"127.0.0.1"),
        (b"te", b"trailers"),
    ]


def test_the_guest_status_and_headers_come_back_without_pseudo_headers() -> None:
    status, headers = response_headers(
        [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"connection", b"close"),
         (b"grpc-status", b"7"), (b"grpc-message", b"no")]
    )  # fmt: skip
    assert status == 200
    assert headers == [(b"content-type", b"application/grpc"), (b"grpc-status", b"7"), (b"grpc-message", b"no")]
