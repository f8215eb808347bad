"""The in-process end of the change feed: the callbacks that want to hear about VM changes."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from vmm.jsonlog import log

from .api import ChangeCallback, GapCallback, Unsubscribe


class Subscribers:
    """Calls every subscribed callback; one failing callback does not stop the others."""

    def __init__(self) -> None:
        self._changes: list[ChangeCallback] = []
        self._gaps: list[GapCallback] = []

    def add(self, on_change: ChangeCallback, on_gap: GapCallback | None) -> Unsubscribe:
        self._changes.append(on_change)
        if on_gap is not None:
            self._gaps.append(on_gap)

        def unsubscribe() -> None:
            if on_change in self._changes:
                self._changes.remove(on_change)
            if on_gap in self._gaps:
                self._gaps.remove(on_gap)

        return unsubscribe

    def changed(self, vm_id: str) -> None:
        for callback in list(self._changes):
            _call(partial(callback, vm_id), vm=vm_id)

    def gap(self) -> None:
        for callback in list(self._gaps):
            _call(callback)


def _call(fn: Callable[[], None], **fields: str) -> None:
    try:
        fn()
    except Exception as exc:
        log.event("catalog.subscriber_failed", level="error", error=repr(exc), **fields)
