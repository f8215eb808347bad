"""Which guest port a request is for, as Lambda MicroVMs picks it: the `<port>-<vm-id>.` host name,
an `X-Mvm-Port: N` header, or a WebSocket subprotocol `mvm.port.N` (a browser's WebSocket cannot set
headers). No port named: the VM's app port.

Pure, on the raw header values, so that every protocol's admission calls the same `choose_port`
(HTTP/1.1's is edge/admission.py). The header and the subprotocol entry are the edge's, never the
guest's: the caller forwards `PortChoice.subprotocols` in place of what the client sent, and, when the
port entry was the only one offered, answers with `PortChoice.echo` (a browser fails a handshake
whose answer selects no subprotocol after it offered one).
"""

from __future__ import annotations

from dataclasses import dataclass

HEADER = b"x-mvm-port"
SUBPROTOCOL_PREFIX = b"mvm.port."


@dataclass(frozen=True, slots=True)
class PortChoice:
    port: int | None  # None: the VM's app port; a port named must be on the VM's allow-list
    subprotocols: bytes | None  # Sec-WebSocket-Protocol for the guest, without the port entry; None: none
    echo: bytes | None  # Sec-WebSocket-Protocol for the client's 101 answer, when the guest is offered none


def choose_port(hostname_port: int | None, header: bytes | None, subprotocols: bytes | None) -> PortChoice | str:
    """The port the request names, or why it cannot be served (a 400's message).

    Two ways of naming a port in one request must agree."""
    asked: dict[str, int] = {}
    if hostname_port is not None:
        asked["the host name"] = hostname_port
    if header is not None:
        port = _port(header)
        if port is None:
            return f"X-Mvm-Port must be one port number in 1-65535, got {header.decode('latin-1')[:40]!r}"
        asked["X-Mvm-Port"] = port
    kept: list[bytes] = []
    entry: bytes | None = None
    for item in subprotocols.split(b",") if subprotocols is not None else ():
        name = item.strip()
        if not name.lower().startswith(SUBPROTOCOL_PREFIX):
            kept.append(name)
            continue
        port = _port(name[len(SUBPROTOCOL_PREFIX) :])
        if port is None or asked.get("the subprotocol", port) != port:
            return f"the WebSocket subprotocol {name.decode('latin-1')[:40]!r} must be one mvm.port.<1-65535>"
        asked["the subprotocol"], entry = port, name
    if len(set(asked.values())) > 1:
        return "the request names two ports: " + ", ".join(f"{port} by {how}" for how, port in asked.items())
    port = next(iter(asked.values()), None)
    forwarded = b", ".join(kept) if kept else None
    echo = entry if entry is not None and not kept else None
    return PortChoice(port, forwarded if entry is not None else subprotocols, echo)


def _port(text: bytes) -> int | None:
    text = text.strip()
    if not text.isdigit() or len(text) > 5 or text.startswith(b"0"):
        return None
    port = int(text)
    return port if port <= 65535 else None
