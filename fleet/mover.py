"""The edge's part of moving VMs: one VM to a named host, or every VM off a host (drain).

The order keeps the VM whole whatever fails: suspend it on its host, stream its files
from that host's export straight into the target's import, re-place it in the catalog
(only if it is still where it was), and only then let the source forget it. Until the
catalog says otherwise the VM belongs to the source, which lets it wake again if the
move did not finish.
"""

from __future__ import annotations

from typing import Any

from fleet.catalog import HostRecord
from vmm.errors import Conflict, InvalidRequest, NotFound, NotRunning, VmmError
from vmm.jsonlog import log
from vmm.model import VmState

from .host_client import HostClient, HostError
from .move_api import RECORD_HEADER, TEMPLATE_HEADER
from .placement import candidates
from .routes import RouteTable

CHUNK = 1 << 20


class Mover:
    def __init__(self, routes: RouteTable, hosts: HostClient) -> None:
        self.routes = routes
        self.hosts = hosts

    def _up_host(self, host_id: str) -> HostRecord:
        host = self.routes.host(host_id)
        if host is None:
            raise NotFound(f"host {host_id!r} is not in the catalog (see GET /v1/hosts)")
        if not self.routes.host_up(host_id):
            raise NotRunning(f"host {host_id} is not answering heartbeats")
        return host

    async def move(self, vm_id: str, to: str) -> dict[str, Any]:
        """Move one VM to host `to`, suspending it first if it runs; returns its record there."""
        placed = await self.routes.reload(vm_id)
        if placed is None:
            raise NotFound(f"VM {vm_id!r} does not exist")
        if placed.host_id == to:
            raise InvalidRequest(f"VM {vm_id} is on host {to} already")
        source, target = self._up_host(placed.host_id), self._up_host(to)
        if to not in await self.routes.catalog.template_hosts(placed.rec.template):
            raise Conflict(f"host {to} does not have template {placed.rec.template!r}")
        if placed.rec.state is not VmState.SUSPENDED:
            await self.hosts.call(source.id, source.address, "POST", f"/v1/vms/{vm_id}/suspend")
        try:
            moved = await self._copy(vm_id, source, target)
            if not await self.routes.catalog.move_vm(vm_id, source.id, target.id):
                raise Conflict(f"VM {vm_id} left host {source.id} during the move")
        except BaseException:
            await self._abandon(vm_id, source, target)
            raise
        await self.hosts.call(source.id, source.address, "POST", f"/v1/vms/{vm_id}/export/done", {"moved_to": to})
        await self.routes.reload(vm_id)
        log.event("edge.vm_moved", vm=vm_id, source=source.id, target=target.id)
        moved["host"] = to
        return moved

    async def drain(self, host_id: str) -> dict[str, Any]:
        """Move every VM off `host_id` (running ones are suspended first) to the best other host each."""
        self._up_host(host_id)
        moved, failed = [], []
        for placed in await self.routes.catalog.list_vms(host_id=host_id):
            having = await self.routes.catalog.template_hosts(placed.rec.template)
            others = [h for h in candidates(self.routes.hosts(), having, self.routes.host_up) if h.id != host_id]
            try:
                if not others:
                    raise NotRunning(f"no other host that is up has template {placed.rec.template!r}")
                await self.move(placed.rec.id, others[0].id)
                moved.append({"vm": placed.rec.id, "to": others[0].id})
            except VmmError as exc:
                failed.append({"vm": placed.rec.id, "error": str(exc)})
        log.event("edge.host_drained", host=host_id, moved=len(moved), failed=len(failed))
        return {"host": host_id, "moved": moved, "failed": failed}

    async def _copy(self, vm_id: str, source: HostRecord, target: HostRecord) -> dict[str, Any]:
        """Stream the export of `source` into the import of `target`."""
        session = self.hosts.session
        async with session.get(self.hosts.url(source.address, f"/v1/vms/{vm_id}/export")) as exported:
            if exported.status != 200:
                raise HostError(exported.status, f"host {source.id}: {(await exported.text())[:500]}")
            headers = {name: exported.headers[name] for name in (RECORD_HEADER, TEMPLATE_HEADER)}
            url = self.hosts.url(target.address, "/v1/host/import")
            async with session.post(url, data=exported.content.iter_chunked(CHUNK), headers=headers) as imported:
                if imported.status != 201:
                    raise HostError(imported.status, f"host {target.id}: {(await imported.text())[:500]}")
                answer: dict[str, Any] = await imported.json()
                return answer

    async def _abandon(self, vm_id: str, source: HostRecord, target: HostRecord) -> None:
        """The move failed: the target drops any copy it made, the source keeps the VM and may wake it."""
        for host, method, path, body in (
            (target, "DELETE", f"/v1/vms/{vm_id}", None),
            (source, "POST", f"/v1/vms/{vm_id}/export/done", {"moved_to": None}),
        ):
            try:
                await self.hosts.call(host.id, host.address, method, path, body)
            except VmmError as exc:
                log.event("edge.move_cleanup", level="warning", vm=vm_id, host=host.id, error=str(exc))
