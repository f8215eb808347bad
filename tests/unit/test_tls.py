import asyncio
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from edge.tls import TlsError, make_dev_cert, server_context


def test_dev_cert_files_and_names(tmp_path: Path) -> None:
    cert, key = make_dev_cert("mvm.localhost", tmp_path / "tls", extra_hosts=["127.0.0.1", "edge.internal"])
    assert (cert, key) == (tmp_path / "tls/dev.crt", tmp_path / "tls/dev.key")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mvm.localhost", "*.mvm.localhost", "edge.internal"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert parsed.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_key_mode_is_tightened_on_rewrite(tmp_path: Path) -> None:
    (tmp_path / "dev.key").write_text("old")
    (tmp_path / "dev.key").chmod(0o644)
    _, key = make_dev_cert("mvm.localhost", tmp_path)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_server_context_refuses_old_tls(tmp_path: Path) -> None:
    ctx = server_context(*make_dev_cert("mvm.localhost", tmp_path))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


async def test_handshake_with_dev_cert_as_ca(tmp_path: Path) -> None:
    cert, key = make_dev_cert("mvm.localhost", tmp_path)
    server = await asyncio.start_server(_echo_alpn, "127.0.0.1", 0, ssl=server_context(cert, key))
    port = server.sockets[0].getsockname()[1]
    client = ssl.create_default_context(cafile=str(cert))
    client.set_alpn_protocols(["h2", "http/1.1"])
    try:
        for name in ("abc123.mvm.localhost", "8081-abc123.mvm.localhost", "mvm.localhost"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=name)
            assert await reader.read() == b"http/1.1"
            writer.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="other.example")
    finally:
        server.close()
        await server.wait_closed()


async def _echo_alpn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    ssl_object = writer.get_extra_info("ssl_object")
    writer.write((ssl_object.selected_alpn_protocol() or "").encode())
    await writer.drain()
    writer.close()


def test_missing_files_are_named(tmp_path: Path) -> None:
    cert, key = make_dev_cert("mvm.localhost", tmp_path)
    with pytest.raises(TlsError, match=r"certificate .*nope\.crt does not exist"):
        server_context(tmp_path / "nope.crt", key)
    with pytest.raises(TlsError, match=r"private key .*nope\.key does not exist"):
        server_context(cert, tmp_path / "nope.key")


def test_mismatched_key_is_refused(tmp_path: Path) -> None:
    cert, _ = make_dev_cert("mvm.localhost", tmp_path / "a")
    _, other_key = make_dev_cert("mvm.localhost", tmp_path / "b")
    with pytest.raises(TlsError, match="cannot be loaded"):
        server_context(cert, other_key)
