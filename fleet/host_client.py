"""How edges call a VM host's API: JSON over HTTP with the cluster secret, errors back as VmmErrors.

With cluster TLS every call is mutual TLS (the edge's certificate, the host's checked against
its address) and a host that publishes a plaintext address is refused; without, only hosts on
loopback are called.

A host's answer keeps its status and message, so a client of the edge sees what the host
said (e.g. 507 when it is full, 409 for a VM in the wrong state). A host that does not
answer is `unavailable` (503): its VMs are not lost, only out of reach for now.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from vmm.errors import NotRunning, VmmError

from .cluster_tls import is_loopback
from .host_sync import HostAddress

TIMEOUT = aiohttp.ClientTimeout(total=120, connect=5)
# A request forwarded to a host lasts as long as the host's answer: an exec, a file transfer or a
# log that follows runs on past any fixed total, and the host's own limits (exec timeout) end it.
FORWARD_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=5)


class HostError(VmmError):
    """An error answer from a host, passed on with the host's own status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = status


class HostClient:
    """One HTTP connection pool to every host of the fleet."""

    def __init__(self, secret: str, tls: ssl.SSLContext | None = None) -> None:
        self._auth = {"Authorization": f"Bearer {secret}"}
        self.tls = tls
        self._session: aiohttp.ClientSession | None = None
        self._retired: list[aiohttp.ClientSession] = []

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self.tls if self.tls is not None else True)
            self._session = aiohttp.ClientSession(timeout=TIMEOUT, headers=self._auth, connector=connector)
        return self._session

    def renew(self) -> None:
        """After a reload of the cluster files: new requests go out on new connections, checked against
        them. Requests in flight finish on the old pool, whose idle connections expire with its keep-alive."""
        if self._session is not None:
            self._retired.append(self._session)
            self._session = None

    async def close(self) -> None:
        for session in [*self._retired, *([self._session] if self._session is not None else [])]:
            await session.close()

    def url(self, address: str, path: str) -> str:
        """The URL of `path` on a host, refused when it would cross the wire in plaintext."""
        api = HostAddress.parse(address).api
        parts = urlsplit(api)
        if self.tls is not None and parts.scheme != "https":
            raise NotRunning(f"the host at {api} does not speak TLS and this edge requires it (cluster.tls)")
        if self.tls is None and not is_loopback(parts.hostname or ""):
            raise NotRunning(f"the host at {api} is not on loopback: plaintext refused (set cluster.tls = true)")
        return api + path

    async def call(self, host_id: str, address: str, method: str, path: str, body: Any = None) -> Any:
        """One request to a host's API; its JSON answer, or HostError / NotRunning."""
        data = orjson.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else None
        url = self.url(address, path)
        try:
            async with self.session.request(method, url, data=data, headers=headers) as resp:
                payload = await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise NotRunning(f"host {host_id} did not answer ({exc or type(exc).__name__}); try again shortly") from exc
        answer: Any = orjson.loads(payload) if payload else None
        if resp.status >= 400:
            message = answer.get("message") if isinstance(answer, dict) else None
            raise HostError(resp.status, f"host {host_id}: {message or resp.reason}")
        return answer
