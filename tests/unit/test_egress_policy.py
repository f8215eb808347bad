import re

import pytest

from vmm.errors import InvalidRequest
from vmm.network.egress import EgressPolicy, may_dial, refusal


def test_none_is_the_default_and_allows_nothing() -> None:
    for value in ("none", None):
        policy = EgressPolicy.from_json(value)
        assert policy == EgressPolicy() and policy.to_json() == "none"
        assert not policy.allows("example.com", 443)


def test_exact_wildcard_ip_and_any_port() -> None:
    policy = EgressPolicy.from_json(
        ["API.Example.com:443", "*.pypi.org:*", "93.184.215.14:8080", "[2606:2800:21F::1]:443", "localhost.:80"]
    )
    assert policy.allows("api.example.com", 443) and policy.allows("API.EXAMPLE.COM.", 443)
    assert not policy.allows("api.example.com", 80) and not policy.allows("example.com", 443)
    assert not policy.allows("evil-api.example.com", 443)
    assert policy.allows("files.pypi.org", 1) and policy.allows("a.b.pypi.org", 65535)
    assert not policy.allows("pypi.org", 443) and not policy.allows("notpypi.org", 443)
    assert policy.allows("93.184.215.14", 8080) and not policy.allows("93.184.215.14", 80)
    assert policy.allows("[2606:2800:21f:0::1]", 443) and policy.allows("2606:2800:21f::1", 443)
    assert policy.allows("localhost", 80)
    assert not policy.allows("bad host", 80) and not policy.allows("", 80) and not policy.allows("ünï.org", 443)


def test_round_trips_through_json_normalised_and_deduplicated() -> None:
    policy = EgressPolicy.from_json(["a.example.com:443", "A.example.com:443", "*.x.org:*", "[::1]:80"])
    assert policy.to_json() == ["a.example.com:443", "*.x.org:*", "[::1]:80"]
    assert EgressPolicy.from_json(policy.to_json()) == policy


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("all", "policy.egress must be"),
        ({"host": "x"}, "policy.egress must be"),
        (["a.com:443", "b.com"], r"policy.egress\[1\]: expected host:port"),
        (["a.com:443", "b.com:443", 7], r"policy.egress\[2\]: expected a"),
        (["a.com:0"], r"policy.egress\[0\]: port must be"),
        (["a.com:65536"], r"policy.egress\[0\]: port must be"),
        (["a.com:https"], r"policy.egress\[0\]: port must be"),
        (["*:443"], r"policy.egress\[0\]: '\*' is not"),
        (["a.*.com:443"], r"policy.egress\[0\]"),
        (["-a.com:443"], r"policy.egress\[0\]"),
        (["*.10.0.0:443"], r"policy.egress\[0\]"),
        (["::1:443"], r"policy.egress\[0\]: expected host:port"),
        (["a_b.com:443"], r"policy.egress\[0\]"),
        ([f"{'a' * 64}.com:443"], r"policy.egress\[0\]"),
        (["x.com:443"] * 257, "at most 256"),
    ],
)
def test_errors_name_the_key(value: object, key: str) -> None:
    with pytest.raises(InvalidRequest, match=key):
        EgressPolicy.from_json(value)


def test_where_prefixes_errors() -> None:
    with pytest.raises(InvalidRequest, match=r"^template.policy.egress\[0\]"):
        EgressPolicy.from_json(["nope"], where="template.policy.egress")


def test_only_public_addresses_or_the_allowed_literal_are_dialled() -> None:
    assert may_dial("example.com", "93.184.215.14") and may_dial("example.com", "2606:2800:21f:cb07::1")
    for private in ("127.0.0.1", "10.77.0.1", "192.168.1.1", "169.254.169.254", "::1", "fe80::1%2", "0.0.0.0"):
        assert not may_dial("example.com", private)
    assert may_dial("127.0.0.1", "127.0.0.1") and not may_dial("127.0.0.2", "127.0.0.1")


REFUSED = [
    ("10.77.0.1", "private, shared, reserved, benchmarking or documentation"),
    ("172.16.5.4", "private, shared"),
    ("192.168.1.1", "private, shared"),
    ("100.64.0.1", "private, shared"),
    ("[fd00::1]", "private, shared"),
    ("169.254.169.254", "link-local"),
    ("[fe80::1]", "link-local"),
    ("[::ffff:10.0.0.1]", r"\(carrying 10.0.0.1\) is a private"),
    ("[::ffff:169.254.169.254]", r"\(carrying 169.254.169.254\) is a link-local"),
    ("[::10.0.0.1]", r"\(carrying 10.0.0.1\) is a private"),
    ("[64:ff9b::a9fe:a9fe]", r"\(carrying 169.254.169.254\) is a link-local"),
    ("[64:ff9b::10.1.2.3]", r"\(carrying 10.1.2.3\) is a private"),
    ("[64:ff9b:1::808:808]", "local-use NAT64"),
    ("[2002:a00:1::1]", r"\(carrying 10.0.0.1\) is a private"),
    ("0.0.0.0", "unspecified"),
    ("[::]", "unspecified"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.255", "benchmarking"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("192.0.0.1", "reserved"),
    ("203.0.113.7", "documentation"),
    ("[2001:db8::1]", "documentation"),
    ("[100::1]", "reserved"),
    ("224.0.1.1", "multicast"),
    ("[ff0e::1]", "multicast"),
]


@pytest.mark.parametrize(("address", "why"), REFUSED)
def test_non_public_literals_are_refused_naming_the_field_and_the_pattern(address: str, why: str) -> None:
    with pytest.raises(InvalidRequest, match=rf"^policy.egress\[1\]: '{re.escape(address)}:80': .*{why}"):
        EgressPolicy.from_json(["example.com:443", f"{address}:80"])


@pytest.mark.parametrize(("address", "why"), REFUSED)
def test_the_dial_time_check_refuses_the_same_set(address: str, why: str) -> None:
    literal = address.strip("[]")
    assert refusal(literal) is not None
    assert not may_dial("example.com", literal) and not may_dial(literal, literal)


@pytest.mark.parametrize("address", ["8.8.8.8", "::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "2606:2800:21f::1"])
def test_public_addresses_pass_both_checks_also_when_wrapped(address: str) -> None:
    assert refusal(address) is None and may_dial("example.com", address)
    assert EgressPolicy.from_json([f"[{address}]:443" if ":" in address else f"{address}:443"]).rules


def test_loopback_is_listable_and_dialled_only_as_the_listed_literal() -> None:
    assert EgressPolicy.from_json(["127.0.0.1:8080", "[::1]:80", "[::ffff:127.0.0.1]:81"]).rules
    assert may_dial("127.0.0.1", "127.0.0.1") and may_dial("::ffff:127.0.0.1", "127.0.0.1")
    assert not may_dial("localhost", "127.0.0.1") and not may_dial("127.0.0.2", "127.0.0.1")
