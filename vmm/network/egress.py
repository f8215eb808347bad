"""Per-VM egress policy: which `host:port` a guest may reach through the edge's egress proxy.

Pure data and matching, no I/O, so the manager can validate a policy at the API and the
proxy can decide per request. A policy is `"none"` (the default: no egress at all) or a
list of patterns `host:port`, where host is an exact DNS name, a `*.example.com` wildcard
(any name below example.com, not example.com itself) or an IP literal (IPv6 in brackets),
and port is 1-65535 or `*`.

One rule decides which IPs the proxy ever dials, at validation and at dial time alike
(`refusal`): a public unicast address, after unwrapping an IPv4 address carried in IPv6
(IPv4-mapped, IPv4-compatible, NAT64 64:ff9b::/96, 6to4), or loopback when the policy lists
that very literal. A policy that lists any other IP is refused when it is set.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NONE = "none"
MAX_RULES = 256
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: local-use, a translator of some network
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class Rule:
    """One pattern, normalised: lower-case names, canonical IP text, port None for `*`."""

    host: str
    port: int | None
    wildcard: bool = False

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host

    def text(self) -> str:
        host = f"*.{self.host}" if self.wildcard else f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{'*' if self.port is None else self.port}"


@dataclass(frozen=True)
class EgressPolicy:
    """The rules of one VM; no rules means no egress."""

    rules: tuple[Rule, ...] = ()

    def allows(self, host: str, port: int) -> bool:
        """Whether a request for host:port passes; a host that is not a valid name or IP never does."""
        normal = normalise_host(host)
        return normal is not None and any(rule.matches(normal, port) for rule in self.rules)

    def to_json(self) -> str | list[str]:
        """The form stored in a Policy and shown by the API; from_json reads it back."""
        return [rule.text() for rule in self.rules] if self.rules else NONE

    @classmethod
    def from_json(cls, value: Any, where: str = "policy.egress") -> EgressPolicy:
        """Validate `value`; errors name the offending key, e.g. policy.egress[2]."""
        if value is None or value == NONE:
            return cls()
        if not isinstance(value, list):
            raise InvalidRequest(f'{where} must be "none" or a list of "host:port" patterns, got {value!r}')
        if len(value) > MAX_RULES:
            raise InvalidRequest(f"{where} has {len(value)} patterns, at most {MAX_RULES} are allowed")
        rules = tuple(dict.fromkeys(_parse_rule(item, f"{where}[{i}]") for i, item in enumerate(value)))
        return cls(rules)


def normalise_host(host: str) -> str | None:
    """Canonical form of a requested host (lower case, IPs compressed, brackets and a final dot off), or None."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host.lower().removesuffix(".")
    if not name.isascii() or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        return None
    return name


def unwrap(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (mapped, compatible, NAT64 64:ff9b::/96, 6to4), else itself."""
    if isinstance(address, ipaddress.IPv4Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (int(address) >> 32 == 0 and int(address) > 1):  # NAT64, or compatible (not :: or ::1)
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def refusal(address: str) -> str | None:
    """Why the egress proxy never dials the IP `address`, whatever a policy says; None when it may.

    The one rule of validation and dial time: a public unicast address, judged after `unwrap`,
    or loopback (which `may_dial` allows only as the very literal a policy lists).
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address} is not an IP address"
    inner = unwrap(ip)
    shown = address if inner == ip else f"{address} (carrying {inner})"
    if inner.is_loopback:
        return None
    if ip in _LOCAL_NAT64:
        return f"{shown} is a local-use NAT64 address (64:ff9b:1::/48)"
    if inner.is_unspecified:
        return f"{shown} is the unspecified address"
    if inner.is_link_local:
        return f"{shown} is a link-local address"
    if inner.is_multicast:
        return f"{shown} is a multicast address"
    if not inner.is_global:
        return f"{shown} is a private, shared, reserved, benchmarking or documentation address"
    return None


def may_dial(target: str, address: str) -> bool:
    """Whether the proxy may connect to `address`, which the allowed (normalised) `target` resolved to.

    Only addresses `refusal` passes, and loopback only when the target is that very IP literal
    (a policy must list it explicitly): the proxy runs in the host's root namespace, so a name
    resolving to 127.0.0.1 would otherwise reach the host's own services.
    """
    if refusal(address) is not None:
        return False
    ip = unwrap(ipaddress.ip_address(address.split("%", 1)[0]))
    if not ip.is_loopback:
        return True
    try:
        return unwrap(ipaddress.ip_address(target)) == ip
    except ValueError:
        return False


class EgressServer(Protocol):
    """Who serves VMs' egress proxies (vmm.network.egress_proxy.EgressProxies): the manager opens one when a
    VM's namespace is ready to run a guest and closes it before the namespace goes."""

    async def open(self, vm_id: str, policy: EgressPolicy) -> None: ...
    async def close(self, vm_id: str) -> None: ...


def split_authority(authority: str) -> tuple[str, str]:
    """`host:port` or `[v6]:port` into host and port text; ValueError when there is no port."""
    host, sep, port = authority.rpartition(":")
    if not sep or not host or (":" in host and not (host.startswith("[") and host.endswith("]"))):
        raise ValueError(f"expected host:port, got {authority!r}")
    return host, port


def _parse_rule(item: Any, key: str) -> Rule:
    if not isinstance(item, str):
        raise InvalidRequest(f'{key}: expected a "host:port" string, got {item!r}')
    try:
        host_text, port_text = split_authority(item.strip())
    except ValueError as e:
        raise InvalidRequest(f"{key}: {e}") from None
    if port_text == "*":
        port = None
    elif port_text.isdigit() and 1 <= int(port_text) <= 65535:
        port = int(port_text)
    else:
        raise InvalidRequest(f"{key}: port must be 1-65535 or *, got {port_text!r}")
    wildcard = host_text.startswith("*.")
    host = normalise_host(host_text[2:] if wildcard else host_text)
    if host is None or (wildcard and ":" in host) or (wildcard and host.replace(".", "").isdigit()):
        raise InvalidRequest(f"{key}: {host_text!r} is not a DNS name, *.name wildcard or IP address")
    why = refusal(host) if not wildcard and _is_ip(host) else None
    if why is not None:
        raise InvalidRequest(
            f"{key}: {item.strip()!r}: {why}; the egress proxy never dials it "
            "(list a public address, a name, or a loopback service of this host)"
        )
    return Rule(host, port, wildcard)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
