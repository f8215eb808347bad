"""What the data plane and the control API need from the VM plane; vmm.manager.VmManager provides it."""

from __future__ import annotations

import socket
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from vmm.agent import Exec
from vmm.applog import AppLog
from vmm.image import Image
from vmm.model import Template, VmRecord
from vmm.usage import VmUsage


class VmBackend(Protocol):
    """The calls on the request path. Tests may pass a fake."""

    def lookup(self, vm_id: str) -> VmRecord | None:
        """The VM's current record, or None when no such VM exists (cheap, in memory)."""

    async def ensure_running(self, vm_id: str) -> bool:
        """Resume or restore the VM if needed; True when it had to wake. Callers at the same
        time get one wake (the manager's lock), but each call may cost the owner a look (or, in
        an edge worker, a request to the VM's host): the data plane asks once per VM at a
        time (`edge.proxy_context.ProxyContext.wake`).

        Raises vmm.errors.VmmError subclasses (NotFound, RestoreFailed, VmFailed, Conflict).
        """

    async def confirm_running(self, vm_id: str) -> bool:
        """Ask the VM's owner, not this process's view of it, to make it run (waking it if
        needed): a connect failed although the VM looked running. True when it had to wake."""

    async def open_upstream(self, vm_id: str, port: int, timeout: float) -> socket.socket:
        """A non-blocking TCP socket connected to the guest's port, made inside the VM's netns."""

    def touch(self, vm_id: str, at: float | None = None) -> None:
        """Record activity now, or at `at` (requests, bytes on long-lived streams)."""


class ManagedVms(VmBackend, Protocol):
    """What the control API (and its exec, files and shell endpoints) asks of the VM plane."""

    def get(self, vm_id: str) -> VmRecord: ...
    def list_vms(self) -> list[VmRecord]: ...
    async def create_vm(
        self, template_name: str | None = None, policy: dict[str, Any] | None = None, run_payload: Any = None
    ) -> VmRecord: ...
    async def pause(self, vm_id: str) -> VmRecord: ...
    async def suspend(self, vm_id: str) -> VmRecord: ...
    async def resume(self, vm_id: str) -> VmRecord: ...
    async def delete(self, vm_id: str, reason: str = ...) -> None: ...
    def app_log(self, vm_id: str) -> AppLog: ...
    def usage(self, vm_id: str) -> VmUsage: ...
    async def exec(
        self, vm_id: str, argv: list[str], env: list[str], cwd: str, uid: int, gid: int,
        pty: tuple[int, int] | None = None,
    ) -> Exec: ...  # fmt: skip
    def busy(self, vm_id: str) -> AbstractContextManager[None]: ...
    def templates(self) -> list[Template]: ...
    async def create_template(self, name: str, image: str, progress: Callable[[str], None]) -> Template: ...
    def remove_template(self, name: str) -> None: ...
    def images(self) -> list[Image]: ...
    def remove_image(self, name: str) -> None: ...
