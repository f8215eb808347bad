"""Moving a suspended VM between hosts: the host API's export and import, and the edge's move and drain.

A suspended VM is its directory: the device state and its checksum, its own RAM file
(sparse), its disk overlay, its logs and agent key. The source host streams it as a tar
(sparse-aware GNU tar, so holes stay holes) while refusing wakes; the target unpacks it,
points the disk overlay at its own copy of the template's base disk and registers the VM
as suspended. Only then does the catalog place the VM on the target, and the source
forgets it. Any failure before that leaves the VM where it was, and able to wake.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from edge.control import json_response
from vmm.errors import Conflict, InvalidRequest, VmmError
from vmm.jsonlog import log
from vmm.manager import VmManager
from vmm.model import RamMode, VmRecord, VmState
from vmm.policy import Policy

HOST_MANAGER = web.AppKey("host_manager", VmManager)  # the host's own manager (the control API sees a protocol)
RECORD_HEADER = "X-Mvm-Record"
TEMPLATE_HEADER = "X-Mvm-Template-Created"
CHUNK = 1 << 20


def encode_record(rec: VmRecord) -> str:
    data = {
        "id": rec.id, "template": rec.template, "state": rec.state.value, "policy": rec.policy.to_dict(),
        "app_port": rec.app_port, "created_at": rec.created_at, "last_activity": rec.last_activity,
        "state_changed_at": rec.state_changed_at, "ram_mode": rec.ram_mode.value,
    }  # fmt: skip
    return base64.urlsafe_b64encode(orjson.dumps(data)).decode()


def decode_record(text: str) -> VmRecord:
    try:
        data: dict[str, Any] = orjson.loads(base64.urlsafe_b64decode(text.encode()))
        return VmRecord(
            id=str(data["id"]), template=str(data["template"]), state=VmState(data["state"]),
            policy=Policy.from_dict(data["policy"]), app_port=int(data["app_port"]),
            created_at=float(data["created_at"]), last_activity=float(data["last_activity"]),
            state_changed_at=float(data["state_changed_at"]), ram_mode=RamMode(data["ram_mode"]),
        )  # fmt: skip
    except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
        raise InvalidRequest(f"{RECORD_HEADER}: not a VM record: {exc}") from exc


async def export_vm(request: web.Request) -> web.StreamResponse:
    """GET /v1/vms/{id}/export: the suspended VM's files as a sparse tar; wakes wait for export/done."""
    manager = request.app[HOST_MANAGER]
    rec, tpl, vm_dir = await manager.begin_export(request.match_info["vm_id"])
    response = web.StreamResponse(headers={
        "Content-Type": "application/x-tar", RECORD_HEADER: encode_record(rec), TEMPLATE_HEADER: repr(tpl.created_at),
    })  # fmt: skip
    tar = await asyncio.create_subprocess_exec(
        "tar", "--sparse", "--exclude=*.sock", "-C", str(vm_dir), "-cf", "-", ".",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert tar.stdout is not None and tar.stderr is not None
    try:
        await response.prepare(request)
        while chunk := await tar.stdout.read(CHUNK):
            await response.write(chunk)
        if await tar.wait() != 0:
            raise VmmError(f"tar of {vm_dir} failed: {(await tar.stderr.read()).decode(errors='replace')[-500:]}")
        await response.write_eof()
    except BaseException:
        if tar.returncode is None:
            tar.kill()
            await tar.wait()
        await manager.end_export(rec.id, None)
        raise
    return response


async def export_done(request: web.Request) -> web.Response:
    """POST /v1/vms/{id}/export/done {"moved_to": host | null}: forget the VM, or let it wake here again."""
    manager = request.app[HOST_MANAGER]
    body: Any = await request.json() if request.can_read_body else {}
    moved_to = body.get("moved_to") if isinstance(body, dict) else None
    if moved_to is not None and not isinstance(moved_to, str):
        raise InvalidRequest("moved_to must be a host id or null")
    await manager.end_export(request.match_info["vm_id"], moved_to)
    return web.Response(status=204)


async def import_vm(request: web.Request) -> web.Response:
    """POST /v1/host/import (a tar from another host's export): the VM is suspended here afterwards."""
    manager = request.app[HOST_MANAGER]
    rec = decode_record(request.headers.get(RECORD_HEADER, ""))
    try:
        template_created = float(request.headers.get(TEMPLATE_HEADER, ""))
    except ValueError as exc:
        raise InvalidRequest(f"{TEMPLATE_HEADER}: the template's creation time is missing") from exc
    if manager.lookup(rec.id) is not None:
        raise Conflict(f"VM {rec.id} exists on this host already")
    files = manager.settings.vms_dir / f".import-{rec.id}"
    shutil.rmtree(files, ignore_errors=True)
    files.mkdir(parents=True)
    started = time.monotonic()
    try:
        await _untar(request, files)
        await manager.adopt_moved(rec, files, template_created)
    except BaseException:
        shutil.rmtree(files, ignore_errors=True)
        raise
    log.event("vm.moved_in", vm=rec.id, ms=round((time.monotonic() - started) * 1000, 1))
    return json_response(manager.get(rec.id).to_dict(), 201)


async def _untar(request: web.Request, into: Path) -> None:
    tar = await asyncio.create_subprocess_exec(
        "tar", "-C", str(into), "-xf", "-", stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert tar.stdin is not None and tar.stderr is not None
    try:
        async for chunk in request.content.iter_chunked(CHUNK):
            tar.stdin.write(chunk)
            await tar.stdin.drain()
        tar.stdin.close()
        if await tar.wait() != 0:
            why = (await tar.stderr.read()).decode(errors="replace")[-500:]
            raise VmmError(f"unpacking the VM's files failed: {why}")
    finally:
        if tar.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                tar.kill()
            await tar.wait()


def add_host_routes(app: web.Application) -> None:
    app.router.add_get("/v1/vms/{vm_id}/export", export_vm)
    app.router.add_post("/v1/vms/{vm_id}/export/done", export_done)
    app.router.add_post("/v1/host/import", import_vm)

