"""The proxy-ceiling bench warns when a proxy does fewer requests with more connections."""

from __future__ import annotations

from bench.edge_bench import concurrency_warnings


def test_a_path_slower_at_64_connections_than_at_4_gets_a_warning() -> None:
    heavy = {"edge, HTTP": 11_300.0, "edge, TLS": 9_200.0}
    light = {"edge, HTTP": 19_100.0, "edge, TLS": 9_000.0}
    (line,) = concurrency_warnings(heavy, light)
    assert line.startswith("WARNING: edge, HTTP: 11,300 req/s at -c64 is below 19,100 at -c4")


def test_no_warning_when_more_connections_do_at_least_as_much() -> None:
    assert concurrency_warnings({"edge, HTTP": 20_000.0}, {"edge, HTTP": 19_100.0}) == []
