"""Run the whole edge process in the test's event loop and talk to it like a client would.

Clients connect to 127.0.0.1 only; the resolver maps every name under the dev domain to
loopback so SNI and Host are the real `<vm-id>.<domain>` names.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from edge import app
from edge.tls import make_dev_cert
from mvm.config import Config, load_config
from vmm.settings import VmmSettings

DOMAIN = "mvm.localhost"
CONTROL = f"api.{DOMAIN}"


class LoopbackResolver(AbstractResolver):
    """Every name resolves to 127.0.0.1: nothing but this machine is ever a target."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        return None


def edge_config(settings: VmmSettings, **proxy: Any) -> Config:
    """The built-in defaults, on an ephemeral loopback port with a fresh cert and a fast reaper."""
    cfg = load_config(None)
    cert, key = make_dev_cert(DOMAIN, settings.state_dir / "tls", extra_hosts=[CONTROL])
    return replace(
        cfg,
        server=replace(cfg.server, listen_port=0, tls_cert=cert, tls_key=key),
        proxy=replace(cfg.proxy, **proxy),
        vmm=replace(settings, default_policy=cfg.vmm.default_policy),
        reaper=replace(cfg.reaper, interval=0.2),
        log=replace(cfg.log, level="warning"),
    )


class Client:
    """An HTTPS client for the control API and the VMs' host names."""

    def __init__(self, edge: app.Edge, session: aiohttp.ClientSession) -> None:
        self.edge = edge
        self.session = session
        self.base = f"https://{{host}}:{edge.port}"
        self.admin = {"Authorization": f"Bearer {edge.cfg.server.admin_key}"}

    def vm_url(self, vm_id: str, path: str = "/", port: int | None = None) -> str:
        host = f"{port}-{vm_id}.{DOMAIN}" if port else f"{vm_id}.{DOMAIN}"
        return self.base.format(host=host) + path

    async def api(self, method: str, path: str, body: Any = None, status: int | None = None) -> Any:
        async with self.session.request(
            method, self.base.format(host=CONTROL) + path, json=body, headers=self.admin
        ) as resp:
            data = await resp.json() if resp.status != 204 else None
            if status is not None:
                assert resp.status == status, data
            return data

    async def create_vm(self, **policy: Any) -> str:
        vm = await self.api("POST", "/v1/vms", {"policy": policy} if policy else {}, status=201)
        return str(vm["id"])

    async def token(self, vm_id: str, ttl: float | None = None) -> str:
        data = await self.api("POST", f"/v1/vms/{vm_id}/tokens", {"ttl": ttl} if ttl else {}, status=201)
        return str(data["token"])

    async def get_json(self, vm_id: str, token: str, path: str = "/", port: int | None = None) -> Any:
        async with self.session.get(self.vm_url(vm_id, path, port), headers=bearer(token)) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def running_edge(cfg: Config) -> AsyncIterator[Client]:
    edge = await app.start(cfg)
    ssl_ctx = ssl.create_default_context(cafile=str(cfg.server.tls_cert))
    connector = aiohttp.TCPConnector(resolver=LoopbackResolver(), ssl=ssl_ctx, limit=200)
    try:
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, read_bufsize=1 << 21) as session:
            yield Client(edge, session)
    finally:
        for rec in list(edge.manager.list_vms()):
            await edge.manager.delete(rec.id)
        await app.stop(edge)


def pattern(offset: int, size: int) -> bytes:
    """The demo app's byte pattern (byte i == i % 251) for [offset, offset + size)."""
    block = bytes(range(251)) * (size // 251 + 2)
    start = offset % 251
    return block[start : start + size]


def cert_path(client: Client) -> Path:
    return client.edge.cfg.server.tls_cert
