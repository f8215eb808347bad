"""A bound on restores running at once (vmm.max_concurrent_restores), served first come, first served.

Under TCG a restore is CPU work: more of them at once than the machine has cores only makes each
one slower, and the last request of a burst waits as long either way. Wakes past the bound wait
here in the order they asked; a slot passes straight to the longest waiting one, so a wake that
arrives later never overtakes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import AsyncIterator

from .jsonlog import log


def default_bound() -> int:
    """One restore per core: the machine stays busy and none starves the others."""
    return max(1, os.cpu_count() or 1)


class RestoreGate:
    """At most `bound` holders at once; the others queue in arrival order (FIFO)."""

    def __init__(self, bound: int) -> None:
        self.bound = bound or default_bound()
        self._running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    @contextlib.asynccontextmanager
    async def slot(self, vm_id: str) -> AsyncIterator[None]:
        """Hold one of the slots for the body (a VM's restore)."""
        if self._running < self.bound and not self._waiting:
            self._running += 1
        else:
            await self._wait_turn(vm_id)
        try:
            yield
        finally:
            self._release()

    async def _wait_turn(self, vm_id: str) -> None:
        """Queued until a holder hands its slot over; a waiter that gives up hands on one it was given."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        started = time.monotonic()
        log.event("vm.restore_queued", vm=vm_id, ahead=len(self._waiting) - 1, running=self._running)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release()  # the slot was handed over as this waiter gave up: the next one gets it
            else:
                self._waiting.remove(turn)
            raise
        log.event("vm.restore_dequeued", vm=vm_id, waited_ms=round((time.monotonic() - started) * 1000, 1))

    def _release(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes on: _running stays as it is
                return
        self._running -= 1
