"""Giving memory back to the OS after bursts of client connections.

A TLS client connection costs some 40 KB of small OpenSSL and Python allocations. Freed
after a burst, they leave glibc's heap fragmented: its own trim only releases the top of
the heap, so the edge's RSS rose with every burst (74 -> 225 MB over bursts of 500) and
never came back, although the memory was free. `malloc_trim(0)` releases free pages from
anywhere in every arena; `BurstTrimmer` calls it once a burst has ended. Elsewhere than
glibc (musl, macOS) both are no-ops.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import time
from collections.abc import Callable

from vmm.jsonlog import log

_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def _libc_function(name: str) -> Callable[..., int] | None:
    try:
        return getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError):
        return None


_malloc_trim = _libc_function("malloc_trim")
_mallopt = _libc_function("mallopt")


def limit_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas: the executor threads that open guest sockets would each
    get an arena of their own, holding memory that the event loop's thread never reuses."""
    return _mallopt is not None and bool(_mallopt(_M_ARENA_MAX, arenas))


def trim() -> bool:
    """Return free heap pages to the OS; False where there is no malloc_trim."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


def rss_bytes() -> int:
    """This process's resident set size (Linux), 0 when unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class BurstTrimmer:
    """Trims once open connections fell to half a recent peak, by at least `min_drop`.

    The trim runs `delay` seconds after that point, once per burst, so a steady trickle of
    connections never pays for it.
    """

    def __init__(self, min_drop: int = 64, delay: float = 1.0, trim_fn: Callable[[], bool] = trim) -> None:
        self.min_drop = min_drop
        self.delay = delay
        self.trims = 0
        self._trim = trim_fn
        self._peak = 0
        self._open = 0
        self._timer: asyncio.TimerHandle | None = None

    def opened(self, open_now: int) -> None:
        self._open = open_now
        if open_now > self._peak:
            self._peak = open_now

    def closed(self, open_now: int) -> None:
        self._open = open_now
        if self._timer is None and self._peak - open_now >= self.min_drop and open_now * 2 <= self._peak:
            self._timer = asyncio.get_running_loop().call_later(self.delay, self._run)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _run(self) -> None:
        self._timer = None
        before, started = rss_bytes(), time.perf_counter()
        gc.collect()  # connections left in reference cycles are freed only by the collector: first
        if self._trim():
            self.trims += 1
            log.event("edge.malloc_trim", level="debug", peak=self._peak, open=self._open, rss_before=before,
                      rss_after=rss_bytes(), ms=round((time.perf_counter() - started) * 1000, 1))  # fmt: skip
        self._peak = self._open
