"""Mutual TLS between the fleet's parts: a host serves its API and data port with its host certificate
and asks every peer for an edge certificate; an edge presents its edge certificate and checks the host's.

Both ends trust the CAs in `cluster.ca_file`, which may hold the old and the new CA together while
certificates are rotated. The files are watched: when one changes, new connections take a context
made from the new files (`SwappableContext`), and connections made before are checked again
(`trusts`): a peer whose certificate no CA in the file issued any more is refused from then on.
A set of files that does not load (a key that does not match its certificate, a certificate no
trusted CA issued) is logged and the previous context kept, so a rotation step done in the wrong
order never takes a running process off the fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import ssl
from collections.abc import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from edge.tls import TlsError
from vmm.jsonlog import log

from .settings import ClusterConfig

WATCH_EVERY = 1.0  # seconds between looks at the files' modification times
MAX_CHECKED = 4096  # peer certificates whose re-check result is remembered until the next reload


def is_loopback(host: str) -> bool:
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class SwappableContext(ssl.SSLContext):
    """An SSLContext for asyncio and aiohttp whose connections each take the context current when they start.

    A listening server or a client pool keeps one context object for its life; this one hands
    every new connection to `current`, which a reload replaces.
    """

    current: ssl.SSLContext

    def __new__(cls, current: ssl.SSLContext) -> SwappableContext:
        return super().__new__(cls, current.protocol)

    def __init__(self, current: ssl.SSLContext) -> None:
        self.current = current

    def wrap_bio(  # type: ignore[override]
        self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
        server_hostname: str | None = None, session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:  # fmt: skip
        return self.current.wrap_bio(incoming, outgoing, server_side, server_hostname, session)


class ClusterTls:
    """One process's cluster TLS: its role's certificate, the trusted CAs, reloaded when the files change."""

    def __init__(self, cluster: ClusterConfig, role: str) -> None:
        self.role = role
        self.files = {"cluster.ca_file": cluster.ca_file}
        if role == "host":
            self.files |= {"cluster.host_cert": cluster.host_cert, "cluster.host_key": cluster.host_key}
        else:
            self.files |= {"cluster.edge_cert": cluster.edge_cert, "cluster.edge_key": cluster.edge_key}
        self._seen = self._stamp()
        current, self._cas = self._load()
        self.context = SwappableContext(current)
        self._checked: dict[bytes, bool] = {}
        self.listeners: list[Callable[[], object]] = []  # called after a reload, e.g. to re-check open tunnels
        self._watcher: asyncio.Task[None] | None = None

    def _stamp(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in self.files.values():
            try:
                st = path.stat()
                stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                stamps.append((0, 0, 0))
        return tuple(stamps)

    def _load(self) -> tuple[ssl.SSLContext, list[x509.Certificate]]:
        (ca_key, ca), (cert_key, cert), (key_key, key) = self.files.items()
        for name, path in self.files.items():
            if not path.is_file():
                raise TlsError(f"{name}: {path} does not exist (run `mvm cluster init`, see the README's fleet part)")
            if not os.access(path, os.R_OK):
                raise TlsError(f"{name}: {path} is not readable by this user")
        try:
            cas = x509.load_pem_x509_certificates(ca.read_bytes())
            own = x509.load_pem_x509_certificate(cert.read_bytes())
        except ValueError as e:
            raise TlsError(f"{ca_key} or {cert_key}: not PEM certificates: {e}") from None
        if not any(_issued_by(own, c) for c in cas):
            raise TlsError(f"{cert_key}: {cert} was not issued by any CA in {ca_key} ({ca})")
        server = self.role == "host"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        ctx.verify_mode = ssl.CERT_REQUIRED  # a server asks every peer for a certificate, a client checks the host's
        try:
            ctx.load_verify_locations(cafile=str(ca))
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as e:
            raise TlsError(f"{cert_key} with {key_key}: cannot be loaded: {e}") from None
        return ctx, cas

    def trusts(self, ssl_object: ssl.SSLObject | None) -> bool:
        """Whether a connection's peer is still trusted: made with the current files, or its certificate
        issued by a CA in the current trust file and not expired."""
        if ssl_object is None:
            return False
        if ssl_object.context is self.context.current:
            return True
        der = ssl_object.getpeercert(binary_form=True)
        if der is None:
            return False
        known = self._checked.get(der)
        if known is None:
            peer = x509.load_der_x509_certificate(der)
            fresh = peer.not_valid_after_utc > datetime.datetime.now(datetime.UTC)
            known = fresh and any(_issued_by(peer, ca) for ca in self._cas)
            if len(self._checked) >= MAX_CHECKED:
                self._checked.clear()
            self._checked[der] = known
        return known

    def reload(self) -> bool:
        """Take the files again if they changed since the last look; True when the new ones are in use."""
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        self._seen = stamp  # a set that fails is tried again once one of its files changes
        try:
            self.context.current, self._cas = self._load()
        except TlsError as e:
            log.event("cluster.tls_reload_failed", level="error", role=self.role, error=str(e))
            return False
        self._checked = {}
        log.event("cluster.tls_reloaded", role=self.role, cas=[ca.subject.rfc4514_string() for ca in self._cas])
        for listener in self.listeners:
            listener()
        return True

    def watch(self) -> None:
        self._watcher = asyncio.create_task(self._watch_forever())

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(WATCH_EVERY)
            self.reload()


def cluster_tls(cluster: ClusterConfig, role: str) -> ClusterTls | None:
    """The role's cluster TLS, or None when the fleet speaks plaintext (loopback only: checked at load)."""
    return ClusterTls(cluster, role) if cluster.tls else None


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
