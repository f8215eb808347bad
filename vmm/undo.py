"""What a transition has acquired so far, released in reverse order if it fails part-way."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from .errors import VmmError
from .jsonlog import log


class Undo:
    """A cleanup list built as a transition acquires each resource (namespace, egress listener,
    QEMU, files): a failure releases exactly those, newest first, each step tried even if an
    earlier one failed."""

    def __init__(self, vm_id: str) -> None:
        self.vm_id = vm_id
        self._steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []

    def push(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        self._steps.append((what, step))

    def keep(self) -> None:
        """The transition holds what it acquired: nothing is to be released any more."""
        self._steps.clear()

    async def run(self) -> None:
        while self._steps:
            what, step = self._steps.pop()
            try:
                await step()
            except (VmmError, OSError) as exc:
                log.event("vm.undo_step_failed", level="warning", vm=self.vm_id, step=what, error=str(exc))
