"""Which guest ports speak prior-knowledge HTTP/2 (h2c), from an image's `mvm.port.<n>.protocol` labels.

A gRPC server speaks only HTTP/2; the edge must know it before it connects, since an h2c port
answers an HTTP/1.1 request with a protocol error. The labels ride in the image's metadata, so one
reading here serves the build (which refuses a bad label early) and every later load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .errors import InvalidRequest

PROTOCOLS = ("http", "h2c")  # http: HTTP/1.1 (and WebSocket), the default
_LABEL_RE = re.compile(r"mvm\.port\.([^.]*)\.protocol")


def h2c_ports(labels: Mapping[str, str], ports: Iterable[int]) -> tuple[int, ...]:
    """The image's ports labelled h2c, sorted; a label naming no port of the image, or an unknown
    protocol, is refused with the label named."""
    known = set(ports)
    found: list[int] = []
    for key, value in labels.items():
        match = _LABEL_RE.fullmatch(key)
        if match is None:
            continue
        text = match.group(1)
        port = int(text) if text.isascii() and text.isdigit() and not text.startswith("0") else 0
        if port not in known:
            listed = ", ".join(map(str, sorted(known)))
            raise InvalidRequest(f"label {key}={value!r} names no port of the image (its ports: {listed})")
        if value not in PROTOCOLS:
            raise InvalidRequest(f"label {key}={value!r} must be one of {', '.join(PROTOCOLS)}")
        if value == "h2c":
            found.append(port)
    return tuple(sorted(found))
