"""Map a Host header (or TLS SNI name) to the VM and port it addresses.

Names are `<vm-id>.<domain>` (the VM's app port), `<port>-<vm-id>.<domain>` and the
control host. VM ids have no dashes, so the port prefix is never ambiguous.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

VM_ID_RE = r"[a-z][a-z0-9]{5,31}"

_LABEL = re.compile(rf"(?:([1-9][0-9]{{0,4}})-)?({VM_ID_RE})")
_MAX_HOSTNAME = 300  # longer than any valid name with a port; longer ones are not cached


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes: the control API, or a VM and port (None = its app port)."""

    control: bool
    vm_id: str | None = None
    port: int | None = None


_CONTROL = Route(control=True)


class HostnameRouter:
    """Parses Host header names once and caches the answer: they repeat on every request.

    "Hostname" here is always the name a client asked for; "host" in fleet/ is a VM machine.
    """

    def __init__(self, domain: str, control_host: str, cache_size: int = 4096) -> None:
        self._suffix = "." + _normalise(domain)
        self._control = _normalise(control_host)
        self._cache: dict[str, Route | None] = {}
        self._cache_size = cache_size

    def route(self, hostname: str) -> Route | None:
        """The route for `hostname`, or None when it names nothing this edge serves."""
        try:
            return self._cache[hostname]
        except KeyError:
            pass
        result = self._parse(hostname)
        if len(hostname) <= _MAX_HOSTNAME:
            if len(self._cache) >= self._cache_size:
                # Evict the oldest entry: bounded memory even under random Host headers.
                del self._cache[next(iter(self._cache))]
            self._cache[hostname] = result
        return result

    def _parse(self, hostname: str) -> Route | None:
        if not hostname.isascii() or hostname.startswith("["):
            return None  # IDN tricks (e.g. the Kelvin sign lowercases to "k") and IP literals
        name, colon, port = hostname.rpartition(":")
        if not colon:
            name = hostname
        elif port and not port.isdigit():
            return None
        name = _normalise(name)
        if name == self._control:
            return _CONTROL
        if not name.endswith(self._suffix):
            return None
        match = _LABEL.fullmatch(name[: -len(self._suffix)])
        if match is None:
            return None
        port_text, vm_id = match.groups()
        if port_text is None:
            return Route(control=False, vm_id=vm_id)
        vm_port = int(port_text)
        if vm_port > 65535:
            return None
        return Route(control=False, vm_id=vm_id, port=vm_port)


def _normalise(name: str) -> str:
    name = name.lower()
    return name[:-1] if name.endswith(".") else name
