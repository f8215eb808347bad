"""The in-process end of the change feed: the callbacks that want to hear about VM changes."""

from __future__ import annotations

from ..jsonlog import log
from .api import ChangeCallback, Unsubscribe


class Subscribers:
    """Calls every subscribed callback with a VM id; one failing callback does not stop the others."""

    def __init__(self) -> None:
        self._callbacks: list[ChangeCallback] = []

    def add(self, callback: ChangeCallback) -> Unsubscribe:
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    def notify(self, vm_id: str) -> None:
        for callback in list(self._callbacks):
            try:
                callback(vm_id)
            except Exception as exc:
                log.event("catalog.subscriber_failed", level="error", vm=vm_id, error=repr(exc))
