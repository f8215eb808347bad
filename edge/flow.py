"""Why reading from a client is paused, and for how long it has been in all.

Reading is paused for any of several reasons at once and resumes only when none is left.
The time it spent paused is kept because a request body's deadlines must not count the
time the edge itself held the client back.
"""

from __future__ import annotations

from collections.abc import Callable

# Why reading from the client is paused; it resumes when no reason is left.
WAITING = 1  # the request waiting for a wake or a connection has buffered enough body
QUEUED = 2  # later requests are parsed and wait their turn (or bytes after an Upgrade)
UPSTREAM = 4  # the upstream's write buffer is full


class ReadPauses:
    """The reasons reading is paused for (a bit set) and the paused time so far.

    `add` and `remove` answer whether reading must stop or may start again now; the caller
    does it. Times come from `clock`, the connection's, never one of this object's own.
    """

    __slots__ = ("clock", "reasons", "since", "total")

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.reasons = 0
        self.since = 0.0  # when reading last stopped
        self.total = 0.0  # paused time before `since`

    def add(self, why: int) -> bool:
        """Pause for `why`; True when reading was going on until now (so stop it)."""
        was = self.reasons
        if was & why:
            return False
        self.reasons = was | why
        if was:
            return False
        self.since = self.clock()
        return True

    def remove(self, why: int) -> float:
        """`why` no longer holds; the time now when no reason is left (so resume), else 0."""
        was = self.reasons
        if not was & why:
            return 0.0
        self.reasons = was & ~why
        if self.reasons:
            return 0.0
        now = self.clock()
        self.total += now - self.since
        return now

    def clear(self) -> bool:
        """No reason is left (the connection stops caring); True when it was paused."""
        was = self.reasons
        self.reasons = 0
        return bool(was)

    def paused_for(self, now: float) -> float:
        """Seconds reading was paused by the edge, in all."""
        return self.total + (now - self.since if self.reasons else 0.0)
