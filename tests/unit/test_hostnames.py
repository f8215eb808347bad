import pytest

from edge.hostnames import HostnameRouter, Route


@pytest.fixture
def router() -> HostnameRouter:
    return HostnameRouter("mvm.localhost", "api.mvm.localhost")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("abc123.mvm.localhost", Route(control=False, vm_id="abc123")),
        ("8081-abc123.mvm.localhost", Route(control=False, vm_id="abc123", port=8081)),
        ("ABC123.MVM.localhost:8443", Route(control=False, vm_id="abc123")),
        ("abc123.mvm.localhost.", Route(control=False, vm_id="abc123")),
        ("abc123.mvm.localhost.:8443", Route(control=False, vm_id="abc123")),
        ("1-abc123.mvm.localhost", Route(control=False, vm_id="abc123", port=1)),
        ("65535-abc123.mvm.localhost", Route(control=False, vm_id="abc123", port=65535)),
        ("a" + "b" * 31 + ".mvm.localhost", Route(control=False, vm_id="a" + "b" * 31)),
        ("api.mvm.localhost", Route(control=True)),
        ("API.mvm.localhost:443", Route(control=True)),
        ("api.mvm.localhost.", Route(control=True)),
    ],
)
def test_routes(router: HostnameRouter, host: str, expected: Route) -> None:
    assert router.route(host) == expected
    assert router.route(host) == expected  # and again, from the cache


@pytest.mark.parametrize(
    "host",
    [
        "",
        "mvm.localhost",
        "abc123.other.example",
        "abc123.mvm.localhost.evil.com",
        "abc123mvm.localhost",
        "x.abc123.mvm.localhost",  # nested labels
        "abc12.mvm.localhost",  # id too short
        "a" + "b" * 32 + ".mvm.localhost",  # id too long
        "1abc123.mvm.localhost",  # id must start with a letter
        "abc_123.mvm.localhost",
        "0-abc123.mvm.localhost",
        "65536-abc123.mvm.localhost",
        "99999-abc123.mvm.localhost",
        "08081-abc123.mvm.localhost",  # no leading zeros: one name per port
        "-abc123.mvm.localhost",
        "8081--abc123.mvm.localhost",
        "8081-abc-123.mvm.localhost",
        "abc123.mvm.localhost:http",
        "abc123.mvm.localhost:80:80",
        "[::1]:8443",
        "127.0.0.1:8443",
        "\u212aabc123.mvm.localhost",  # Kelvin sign lowercases to "k"
    ],
)
def test_rejects(router: HostnameRouter, host: str) -> None:
    assert router.route(host) is None


def test_control_host_normalised() -> None:
    router = HostnameRouter("Example.COM.", "Control.Example.com")
    assert router.route("control.example.com") == Route(control=True)
    assert router.route("abcdef.example.com") == Route(control=False, vm_id="abcdef")


def test_cache_is_bounded() -> None:
    router = HostnameRouter("mvm.localhost", "api.mvm.localhost", cache_size=8)
    for i in range(100):
        assert router.route(f"vm{i:06d}.mvm.localhost") == Route(control=False, vm_id=f"vm{i:06d}")
        router.route(f"junk{i}.example")
    assert len(router._cache) <= 8
    assert router.route("vm000000.mvm.localhost") == Route(control=False, vm_id="vm000000")


def test_huge_hosts_are_not_cached(router: HostnameRouter) -> None:
    host = "a" * 5000 + ".mvm.localhost"
    assert router.route(host) is None
    assert host not in router._cache
