"""The control API's checkpoints, rewind and fork (vmm.checkpoints, vmm.forks):
POST/GET /v1/vms/{id}/checkpoints, DELETE /v1/vms/{id}/checkpoints/{name}, POST /v1/vms/{id}/restore,
POST /v1/vms/{id}/fork, POST /v1/vms {"from_checkpoint": "<vm>/<name>"} and POST /v1/templates
{"name", "from_vm", "checkpoint"?}.

A VM plane without them (a fleet edge's catalog view) answers 501 naming the host API to use.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from aiohttp import web

from vmm.checkpoints import Checkpoint
from vmm.model import Template, VmRecord

from .backend import ManagedVms


@runtime_checkable
class ForkingVms(Protocol):
    """What these endpoints ask of the VM plane (vmm.manager.VmManager)."""

    async def create_checkpoint(self, vm_id: str, name: str) -> Checkpoint: ...
    def list_checkpoints(self, vm_id: str) -> list[Checkpoint]: ...
    async def delete_checkpoint(self, vm_id: str, name: str) -> None: ...
    async def rewind(self, vm_id: str, name: str) -> VmRecord: ...
    async def fork(
        self, vm_id: str, count: int, policy: dict[str, Any] | None = None, checkpoint: str | None = None
    ) -> list[VmRecord]: ...
    def disk_usage(self, vm_id: str) -> dict[str, object]: ...
    async def create_template_from(self, name: str, vm_id: str, checkpoint: str | None = None) -> Template: ...


def forking(manager: ManagedVms) -> ForkingVms:
    if not isinstance(manager, ForkingVms):
        raise web.HTTPNotImplemented(reason="checkpoints and forks are served by the VM's host (its host API)")
    return manager


def only(body: dict[str, Any], *allowed: str) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise web.HTTPUnprocessableEntity(reason=f"{unknown[0]}: unknown field (allowed: {', '.join(allowed)})")


def parse_from_checkpoint(value: object) -> tuple[str, str]:
    """"<vm>/<name>" -> (vm, name)."""
    if not isinstance(value, str) or value.count("/") != 1 or not all(value.split("/")):
        why = f"from_checkpoint must be \"<vm id>/<checkpoint name>\", got {value!r}"
        raise web.HTTPUnprocessableEntity(reason=why)
    vm_id, name = value.split("/")
    return vm_id, name
