"""What the data plane needs from the VM plane; vmm.manager.VmManager provides it."""

from __future__ import annotations

import socket
from typing import Protocol

from vmm.model import VmRecord


class VmBackend(Protocol):
    """The four calls on the request path. Tests may pass a fake."""

    def lookup(self, vm_id: str) -> VmRecord | None:
        """The VM's current record, or None when no such VM exists (cheap, in memory)."""

    async def ensure_running(self, vm_id: str) -> bool:
        """Resume or restore the VM if needed (single-flight); True when it had to wake.

        Raises vmm.errors.VmmError subclasses (NotFound, RestoreFailed, VmFailed, Conflict).
        """

    async def open_upstream(self, vm_id: str, port: int, timeout: float) -> socket.socket:
        """A non-blocking TCP socket connected to the guest's port, made inside the VM's netns."""

    def touch(self, vm_id: str) -> None:
        """Record activity now (requests, bytes on long-lived streams)."""
