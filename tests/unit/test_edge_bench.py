"""The edge bench: the proxy ceiling's warning for a proxy slower with more connections, the real-guest
goals taken per round, its wrk parsing."""

from __future__ import annotations

import os

from bench.edge_bench import concurrency_warnings, guest_goals
from bench.proc_cpu import cpu_seconds, per_request_us
from bench.tools import WrkResult, parse_wrk


def test_a_path_slower_at_64_connections_than_at_4_gets_a_warning() -> None:
    heavy = {"edge, HTTP": 11_300.0, "edge, TLS": 9_200.0}
    light = {"edge, HTTP": 19_100.0, "edge, TLS": 9_000.0}
    (line,) = concurrency_warnings(heavy, light)
    assert line.startswith("WARNING: edge, HTTP: 11,300 req/s at -c64 is below 19,100 at -c4")


def test_no_warning_when_more_connections_do_at_least_as_much() -> None:
    assert concurrency_warnings({"edge, HTTP": 20_000.0}, {"edge, HTTP": 19_100.0}) == []


def test_wrk_latency_in_seconds_is_parsed() -> None:
    """wrk pads a one-letter unit ("1.53s "): a loaded machine's p99 must not end the run."""
    out = "  Latency Distribution\n     50%    5.56ms\n     99%    1.53s \nRequests/sec:   8200.72\n"
    assert parse_wrk(out) == WrkResult(8200.72, 5.56, 1530.0, 0)


def test_wrk_request_count_is_parsed() -> None:
    out = "  Latency Distribution\n     50%    1.00ms\n     99%    2.00ms\n  123456 requests in 5.00s, 1.2MB read\n"
    assert parse_wrk(out + "Requests/sec:  24691.20\n").requests == 123456


def test_cpu_per_request_comes_from_proc() -> None:
    assert cpu_seconds(os.getpid(), children=False) > 0  # this process has run (imports, at least)
    assert cpu_seconds(2**22 + 1) == 0.0  # above pid_max: no such process
    assert per_request_us(0.5, 10_000) == 50.0 and per_request_us(0.5, 0) is None


def test_real_guest_goals_are_medians_of_each_rounds_ratio() -> None:
    """The guest's speed drifts between rounds: each round's edge and nginx runs are compared together."""
    rps = {"edge": [1000.0, 3000.0, 2000.0], "nginx": [1000.0, 2500.0, 2200.0]}
    cpu = {"edge": [100.0, 80.0, 90.0], "nginx": [50.0, 60.0, 70.0]}
    rps_line, cpu_line = guest_goals(rps, cpu)
    assert rps_line.startswith("- edge / nginx req/s: 1.00, median of the rounds' ratios (1.00, 1.20, 0.91)")
    assert rps_line.endswith("(goal ≥ 0.95: met)")
    assert "edge 90.0 µs, nginx 60.0 µs" in cpu_line and "edge / nginx 1.33" in cpu_line
    assert cpu_line.endswith("(goal ≤ 1.5: met)")
    assert guest_goals({"edge": [], "nginx": []}, {"edge": [], "nginx": []}) == [
        "- edge / nginx: not measured (no requests counted)"
    ]
