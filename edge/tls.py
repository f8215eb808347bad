"""TLS for the edge: the server context, and a self-signed wildcard cert for development."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class TlsError(Exception):
    """The certificate or key cannot be used; the message names the file."""


class _DirectSSLObject(ssl.SSLObject):
    """An SSLObject whose read, write and pending are OpenSSL's own methods (`_ssl._SSLSocket`'s):
    uvloop's TLS transport calls them for every record, and SSLObject's Python methods only pass
    each call on, a Python frame each, several per proxied request. The server context makes its
    connections' objects with it (`SSLContext.sslobject_class`)."""

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        obj: Any = super()._create(*args, **kwargs)  # type: ignore[misc]  # private in typeshed
        inner = obj._sslobj
        obj.read, obj.write, obj.pending = inner.read, inner.write, inner.pending
        return cast(ssl.SSLObject, obj)


def server_context(cert: Path, key: Path, h2: bool = False) -> ssl.SSLContext:
    """A server context: TLS 1.2+, ALPN http/1.1, and h2 first when `h2` ([http2] enabled)."""
    for what, path in (("certificate", cert), ("private key", key)):
        if not path.is_file():
            raise TlsError(f"TLS {what} {path} does not exist (set server.tls_cert/tls_key, or make a dev cert)")
        if not os.access(path, os.R_OK):
            raise TlsError(f"TLS {what} {path} is not readable by this user")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sslobject_class = _DirectSSLObject
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["h2", "http/1.1"] if h2 else ["http/1.1"])
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"TLS certificate {cert} with key {key} cannot be loaded: {e}") from None
    return ctx


def make_dev_cert(domain: str, out_dir: Path, extra_hosts: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write dev.crt and dev.key (0600) for `domain` and `*.domain`.

    The cert is its own CA, so a client trusts it with `cafile=dev.crt`. Extra hosts may be
    names or IP addresses.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(domain), x509.DNSName(f"*.{domain}"), *(alt_name(host) for host in extra_hosts)]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"microvm-edge dev {domain}")])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out_dir / "dev.crt", out_dir / "dev.key"
    write_private_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def alt_name(host: str) -> x509.GeneralName:
    """A subject alternative name for `host`: an IP address entry when it is one, else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """The key as PKCS#8 PEM, mode 0600 (also when the file existed with a wider mode)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(pem)
