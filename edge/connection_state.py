"""What one HTTP/1.1 client connection does with the bytes it reads: its states and the one table of
the moves between them, which `edge.connection_core.ConnectionCore.move` checks every change against."""

from __future__ import annotations

import enum


class ConnectionState(enum.IntEnum):
    """What a client connection does with the bytes it reads. It only moves down this list,
    and from LINGERING on it is closing: what it reads is no longer acted on.

    OPEN -> UPGRADING -> TUNNEL for a 101; OPEN -> UNPARSEABLE after a parse error; any of
    those -> LINGERING or CLOSING -> CLOSED. Whether the edge is draining is separate: a
    draining connection still answers what it received, in any of the first four states.
    """

    OPEN = enum.auto()  # request heads are parsed, bodies read
    UPGRADING = enum.auto()  # an Upgrade request was parsed: later bytes are kept for the tunnel
    TUNNEL = enum.auto()  # after a 101: bytes go both ways as they are until either side closes
    UNPARSEABLE = enum.auto()  # the request stream is broken: what was received is answered, then close
    LINGERING = enum.auto()  # answered and half-closed: a body still arriving is read off for linger_timeout
    CLOSING = enum.auto()  # closed after what was written; aborted if the peer stops reading
    CLOSED = enum.auto()  # the client's transport is gone


_C = ConnectionState
_ENDS = (_C.LINGERING, _C.CLOSING, _C.CLOSED)
CONNECTION_MOVES: dict[ConnectionState, frozenset[ConnectionState]] = {
    _C.OPEN: frozenset((_C.UPGRADING, _C.UNPARSEABLE, *_ENDS)),
    _C.UPGRADING: frozenset((_C.TUNNEL, *_ENDS)),
    _C.TUNNEL: frozenset(_ENDS),
    _C.UNPARSEABLE: frozenset(_ENDS),
    _C.LINGERING: frozenset((_C.CLOSING, _C.CLOSED)),
    _C.CLOSING: frozenset((_C.CLOSED,)),
    _C.CLOSED: frozenset(),
}
