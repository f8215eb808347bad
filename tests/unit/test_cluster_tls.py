"""Cluster certificates and mutual TLS between hosts and edges: issue, verify, refuse, rotate."""

from __future__ import annotations

import asyncio
import socket
import ssl
import stat
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from edge.tls import TlsError
from fleet import cluster_ca, data_port
from fleet.cluster_tls import ClusterTls
from fleet.data_port import DataPort, open_tunnel
from fleet.host_client import HostClient
from fleet.settings import ClusterConfig
from mvm.cli import main
from mvm.config import load_config
from vmm.errors import ConfigError, NotRunning, VmFailed

SECRET = "s" * 32


def _ca(tmp: Path, name: str) -> Path:
    cluster_ca.init_ca(tmp / name, name=f"{name} CA")
    return tmp / name


def _files(tmp: Path, role: str, ca_dirs: list[Path], issuer: Path, stem: str) -> ClusterConfig:
    """A [cluster] whose trust file holds the CAs of `ca_dirs` and whose `role` certificate `issuer` signed."""
    trust = tmp / f"{stem}-trust.pem"
    trust.write_bytes(b"".join((d / "ca.crt").read_bytes() for d in ca_dirs))
    cert, key = cluster_ca.issue(issuer, role, stem, tmp / "issued", cluster_ca.LOOPBACK)
    return ClusterConfig(tls=True, ca_file=trust, **{f"{role}_cert": cert, f"{role}_key": key})


def _replace_file(path: Path, data: bytes) -> None:
    """Written aside and renamed over, as a rotation should: a watcher never sees half a file."""
    aside = path.with_suffix(".new")
    aside.write_bytes(data)
    aside.rename(path)


@pytest.fixture
async def echo_host(tmp_path: Path) -> AsyncIterator[tuple[ClusterTls, int, list[Path]]]:
    """A host's TLS listener (echo after the handshake) trusting CAs old and new, its certificate from old."""
    old, new = _ca(tmp_path, "old"), _ca(tmp_path, "new")
    tls = ClusterTls(_files(tmp_path, "host", [old, new], old, "host"), "host")

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1024):
                if not tls.trusts(writer.get_extra_info("ssl_object")):
                    break
                writer.write(data)
                await writer.drain()
        except (ssl.SSLError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=tls.context)
    yield tls, server.sockets[0].getsockname()[1], [old, new]
    server.close()
    await server.wait_closed()


async def _echo(port: int, ctx: ssl.SSLContext) -> bytes:
    """One round trip; b"" when the host ended the connection instead."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1")
    try:
        writer.write(b"ping")
        return await asyncio.wait_for(reader.read(4), 10)
    finally:
        writer.close()


async def _refused(port: int, ctx: ssl.SSLContext) -> bool:
    """TLS 1.3: a client learns that its certificate was refused with its first read (an alert or the end)."""
    try:
        return await _echo(port, ctx) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def test_init_and_issue_bind_each_role_to_its_use(tmp_path: Path) -> None:
    ca = _ca(tmp_path, "c")
    assert stat.S_IMODE((ca / "ca.key").stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match=r"ca\.key exists"):
        cluster_ca.init_ca(ca)
    authority = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    for role, usage in (("host", ExtendedKeyUsageOID.SERVER_AUTH), ("edge", ExtendedKeyUsageOID.CLIENT_AUTH)):
        cert_path, key_path = cluster_ca.issue(ca, role, f"{role}1", tmp_path / "out", ["10.0.0.5", "h.internal"])
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(authority)
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert (len(names) == 3) == (role == "host"), "only a host's certificate names addresses"
    with pytest.raises(ConfigError, match="role: must be one of host, edge"):
        cluster_ca.issue(ca, "admin", "x", tmp_path)
    with pytest.raises(ConfigError, match="no usable cluster CA"):
        cluster_ca.issue(tmp_path / "none", "edge", "x", tmp_path)


def test_files_that_cannot_serve_are_named(tmp_path: Path) -> None:
    ca, other = _ca(tmp_path, "c"), _ca(tmp_path, "other")
    good = _files(tmp_path, "host", [ca], ca, "host")
    with pytest.raises(TlsError, match=r"cluster\.ca_file: .* does not exist \(run `mvm cluster init`"):
        ClusterTls(replace(good, ca_file=tmp_path / "missing.pem"), "host")
    with pytest.raises(TlsError, match=r"cluster\.edge_cert: .* does not exist"):
        ClusterTls(good, "edge")
    foreign = _files(tmp_path, "host", [other], other, "foreign")
    with pytest.raises(TlsError, match=r"cluster\.host_cert: .* was not issued by any CA in cluster\.ca_file"):
        ClusterTls(replace(good, host_cert=foreign.host_cert, host_key=foreign.host_key), "host")
    with pytest.raises(TlsError, match=r"cluster\.host_cert with cluster\.host_key: cannot be loaded"):
        ClusterTls(replace(good, host_key=foreign.host_key), "host")


async def test_an_edge_of_a_trusted_ca_is_served_and_others_are_refused(
    echo_host: tuple[ClusterTls, int, list[Path]], tmp_path: Path
) -> None:
    _, port, (old, new) = echo_host
    for issuer in (old, new):  # both CAs of the trust file during an overlap
        edge = ClusterTls(_files(tmp_path, "edge", [old, new], issuer, f"edge-{issuer.name}"), "edge")
        assert await _echo(port, edge.context) == b"ping"
    stranger = _ca(tmp_path, "stranger")
    # An edge with a certificate from another CA (which trusts the host), one with none, and a host's
    # certificate used as a client (its role is serving): the handshake fails or the host hangs up.
    other_ca = ClusterTls(_files(tmp_path, "edge", [old, stranger], stranger, "edge-x"), "edge").context
    no_cert = ssl.create_default_context(cafile=str(old / "ca.crt"))
    as_host = ssl.create_default_context(cafile=str(old / "ca.crt"))
    host_cert, host_key = cluster_ca.issue(old, "host", "h2", tmp_path / "h2")
    as_host.load_cert_chain(host_cert, host_key)
    assert [await _refused(port, ctx) for ctx in (other_ca, no_cert, as_host)] == [True, True, True]


async def test_an_edge_refuses_a_host_it_cannot_verify(tmp_path: Path) -> None:
    ca, stranger = _ca(tmp_path, "c"), _ca(tmp_path, "stranger")
    edge = ClusterTls(_files(tmp_path, "edge", [ca], ca, "edge"), "edge")
    for issuer, name in ((stranger, "127.0.0.1"), (ca, "10.9.9.9")):  # another CA; a host named otherwise
        host_cfg = _files(tmp_path, "host", [ca, stranger], issuer, f"h-{issuer.name}")
        host = ClusterTls(host_cfg, "host")
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=host.context)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.open_connection("127.0.0.1", port, ssl=edge.context, server_hostname=name)
        finally:
            server.close()
            await server.wait_closed()


async def test_rotation_drops_the_old_ca_for_new_and_open_connections(
    echo_host: tuple[ClusterTls, int, list[Path]], tmp_path: Path
) -> None:
    host, port, (old, new) = echo_host
    old_edge = ClusterTls(_files(tmp_path, "edge", [old, new], old, "edge-old"), "edge")
    new_edge = ClusterTls(_files(tmp_path, "edge", [old, new], new, "edge-new"), "edge")
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=old_edge.context, server_hostname="127.0.0.1")
    writer.write(b"ping")
    assert await reader.read(4) == b"ping"
    reloaded: list[bool] = []
    host.listeners.append(lambda: reloaded.append(True))
    assert not host.reload(), "nothing changed"

    # The host moves to a certificate of the new CA and drops the old one.
    cert, key = cluster_ca.issue(new, "host", "host", tmp_path / "host-new", cluster_ca.LOOPBACK)
    _replace_file(host.files["cluster.host_key"], key.read_bytes())
    _replace_file(host.files["cluster.host_cert"], cert.read_bytes())
    _replace_file(host.files["cluster.ca_file"], (new / "ca.crt").read_bytes())
    assert host.reload() and reloaded == [True]
    assert await _echo(port, new_edge.context) == b"ping"
    assert await _refused(port, old_edge.context)
    writer.write(b"ping")  # the connection made before the reload is refused from now on
    assert await asyncio.wait_for(reader.read(4), 10) == b""
    writer.close()


async def test_a_reload_that_does_not_load_keeps_the_running_files(
    echo_host: tuple[ClusterTls, int, list[Path]], tmp_path: Path
) -> None:
    host, port, (old, new) = echo_host
    edge = ClusterTls(_files(tmp_path, "edge", [old], old, "edge"), "edge")
    before = host.context.current
    _replace_file(host.files["cluster.ca_file"], (new / "ca.crt").read_bytes())  # its certificate is old's
    assert not host.reload()
    assert host.context.current is before
    assert await _echo(port, edge.context) == b"ping"


async def test_a_tls_tunnel_reaches_the_guest_and_an_untrusted_edge_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, nxt, stranger = _ca(tmp_path, "c"), _ca(tmp_path, "next"), _ca(tmp_path, "stranger")
    guest = await asyncio.start_server(_upper, "127.0.0.1", 0)
    guest_port = guest.sockets[0].getsockname()[1]

    async def connect_guest(vm_id: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", guest_port))
        sock.setblocking(False)
        return sock

    monkeypatch.setattr(data_port.netns, "connect_guest", connect_guest)
    host = ClusterTls(_files(tmp_path, "host", [ca, nxt], ca, "host"), "host")
    port = DataPort(SECRET, lambda vm_id, p: True, tls=host)
    await port.start("127.0.0.1", 0)
    edge = ClusterTls(_files(tmp_path, "edge", [ca, nxt], nxt, "edge"), "edge")
    try:
        sock = await open_tunnel(f"127.0.0.1:{port.port}", SECRET, "vabc", 8080, 5, edge.context)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"hello\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"HELLO\n"
        foreign = ClusterTls(_files(tmp_path, "edge", [ca, stranger], stranger, "edge-x"), "edge")
        with pytest.raises(VmFailed):
            await open_tunnel(f"127.0.0.1:{port.port}", SECRET, "vabc", 8080, 5, foreign.context)
        with pytest.raises(VmFailed, match="not on loopback: plaintext refused"):
            await open_tunnel("10.0.0.5:9101", SECRET, "vabc", 8080, 5)
        # The edge stops trusting the host's CA: its open tunnel there ends, and no new one is made.
        _replace_file(edge.files["cluster.ca_file"], (nxt / "ca.crt").read_bytes())
        assert edge.reload() and data_port.recheck_relays(edge.trusts) == 1
        assert await asyncio.wait_for(reader.read(), 10) == b""
        with pytest.raises(VmFailed, match="certificate verify failed"):
            await open_tunnel(f"127.0.0.1:{port.port}", SECRET, "vabc", 8080, 5, edge.context)
        writer.close()
    finally:
        await port.stop()
        guest.close()
        await guest.wait_closed()


async def _upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while line := await reader.readline():
        writer.write(line.upper())
    writer.close()


async def test_a_renewed_host_client_sends_on_new_connections() -> None:
    client = HostClient(SECRET, ssl.create_default_context())
    first = client.session
    client.renew()
    assert client.session is not first and not first.closed, "requests in flight on the old pool finish there"
    await client.close()
    assert first.closed and client.session.closed


@pytest.mark.parametrize(
    ("tls", "api", "refusal"),
    [
        (True, "http://127.0.0.1:9100", "does not speak TLS"),
        (False, "http://10.0.0.5:9100", "not on loopback: plaintext refused"),
    ],
)
def test_an_edge_calls_no_host_in_plaintext_across_the_wire(tls: bool, api: str, refusal: str) -> None:
    client = HostClient(SECRET, ssl.create_default_context() if tls else None)
    with pytest.raises(NotRunning, match=refusal):
        client.url(f"{api} 127.0.0.1:9101", "/v1/host")
    allowed = "https://10.0.0.5:9100" if tls else "http://[::1]:9100"
    assert client.url(f"{allowed} 10.0.0.5:9101", "/v1/host") == f"{allowed}/v1/host"


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        ('host_listen = "10.0.0.5:9100"', r"cluster\.tls: plaintext fleet traffic is allowed on loopback only"),
        ('advertise = "10.0.0.5:9100"', r"cluster\.tls: plaintext"),
        ("tls = 1", r"cluster\.tls: must be true or false"),
        ('tls = true\nca_file = ""', r"cluster\.ca_file: must be a path"),
    ],
)
def test_cluster_tls_settings_are_checked(tmp_path: Path, lines: str, error: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[cluster]\n{lines}\n")
    with pytest.raises(ConfigError, match=error):
        load_config(cfg)


def test_tls_lets_a_host_listen_beyond_loopback(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\ntls = true\nsecret = "{SECRET}"\nhost_listen = "10.0.0.5:9100"\n')
    cluster = load_config(cfg).cluster
    assert cluster.tls and cluster.ca_file.is_absolute() and cluster.host_cert.name == "host.crt"
    assert not load_config(None).cluster.tls, "one machine: plaintext on loopback unless configured"


def test_the_cluster_commands_write_the_files_the_defaults_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the default config's var/cluster resolves here
    main(["cluster", "init"])
    cluster = replace(load_config(None).cluster, tls=True)
    assert ClusterTls(cluster, "host").files["cluster.host_cert"].is_file()
    assert ClusterTls(cluster, "edge").files["cluster.edge_cert"].is_file()
    main(["cluster", "cert", "--role", "host", "--name", "h1", "--address", "10.0.0.5", "--out", "h1"])
    assert "h1/h1.crt" in capsys.readouterr().out
    for argv, error in (
        (["cluster", "init"], "ca.key exists"),
        (["cluster", "cert", "--role", "edge", "--name", "e1", "--dir", "nowhere"], "no usable cluster CA"),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert err.startswith("mvm: error: ") and error in err and err.count("\n") == 1


async def test_a_peer_that_never_finishes_its_handshake_is_let_go(tmp_path: Path) -> None:
    ca = _ca(tmp_path, "c")
    port = DataPort(SECRET, lambda vm_id, p: True, connect_timeout=0.2,
                    tls=ClusterTls(_files(tmp_path, "host", [ca], ca, "host"), "host"))  # fmt: skip
    await port.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port.port)  # TCP only, no ClientHello
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    finally:
        await port.stop()
