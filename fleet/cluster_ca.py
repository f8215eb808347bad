"""The cluster CA: `mvm cluster init` makes it, `mvm cluster cert` issues a host's or an edge's certificate.

Roles are bound by extended key usage: a host certificate is good only for serving (serverAuth)
and an edge certificate only as a client (clientAuth). A host's key therefore cannot be used to
call another host's API as if it were an edge, and an edge's key cannot serve as a host.
Certificates are issued directly by the CA (no intermediates), so a peer is checked against the
trust file with one signature.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.tls import alt_name, write_private_key
from vmm.errors import ConfigError

ROLES = ("host", "edge")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
_USAGE = {"host": ExtendedKeyUsageOID.SERVER_AUTH, "edge": ExtendedKeyUsageOID.CLIENT_AUTH}


def init_ca(out_dir: Path, name: str = "microvm-edge cluster CA", days: int = 3650) -> tuple[Path, Path]:
    """Write ca.crt and ca.key (0600) in `out_dir`; an existing ca.key is never overwritten."""
    cert_path, key_path = out_dir / "ca.crt", out_dir / "ca.key"
    if key_path.exists():
        raise ConfigError(f"{key_path} exists: a new CA goes in another directory (see the README on rotation)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    public = key.public_key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_private_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def issue(
    ca_dir: Path, role: str, name: str, out_dir: Path, addresses: Sequence[str] = (), days: int = 365,
    stem: str | None = None,
) -> tuple[Path, Path]:  # fmt: skip
    """Write `<stem>.crt` and `<stem>.key` (0600, stem: the name) in `out_dir`, signed by the CA in `ca_dir`.

    A host's certificate names the addresses edges reach it by (IPs or DNS names; they are
    checked like a web server's); an edge's names only the edge.
    """
    if role not in ROLES:
        raise ConfigError(f"role: must be one of {', '.join(ROLES)}, got {role!r}")
    ca_cert, ca_key = load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(name), *(alt_name(address) for address in (addresses if role == "host" else ()))]
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role), x509.NameAttribute(NameOID.COMMON_NAME, name),
    ])  # fmt: skip
    public = key.public_key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([_USAGE[role]]), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out_dir / f"{stem or name}.crt", out_dir / f"{stem or name}.key"
    write_private_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = ca_dir / "ca.crt", ca_dir / "ca.key"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{ca_dir}: no usable cluster CA (ca.crt, ca.key): {e}; run `mvm cluster init`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path}: not an EC key made by `mvm cluster init`")
    return cert, key


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
    )  # fmt: skip
