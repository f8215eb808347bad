import ipaddress
from dataclasses import fields
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from edge.h2_settings import Http2Settings
from edge.settings import token_service
from mvm import config as config_module
from mvm.config import Config, load_config
from vmm.errors import ConfigError
from vmm.policy import Policy
from vmm.settings import JailSettings, VmmSettings

DEV_TOML = Path(__file__).resolve().parents[2] / "configs" / "dev.toml"
VM = "vmaaaaaa"


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_config(path)


def test_defaults() -> None:
    cfg = load_config(None)
    assert cfg.server.listen_host == "127.0.0.1" and cfg.server.listen_port == 8443
    assert cfg.server.control_host == "api.mvm.localhost"
    assert cfg.server.tls and cfg.server.tls_cert == Path.cwd() / "var/tls/dev.crt"
    assert cfg.proxy.max_held_per_vm == 256 and cfg.proxy.retry_after == 2
    assert cfg.tokens.active_kid == "dev-hs256" and len(cfg.tokens.keys) == 1
    assert cfg.vmm.state_dir == Path.cwd() / "var" and cfg.vmm.accelerator == "auto"
    assert cfg.vmm.default_policy == Policy(idle_suspend_after=300, max_lifetime=28800, ports=(8081,))
    assert cfg.reaper.interval == 1.0 and cfg.log.level == "info"
    assert cfg.server.per_vm_metrics is False  # one series per VM and figure: asked for, never by default
    assert "dev-admin-key" not in repr(cfg) and "dev-secret" not in repr(cfg)


def test_dev_toml_is_the_defaults() -> None:
    assert load_config(DEV_TOML) == load_config(None)


def test_default_tokens_work() -> None:
    tokens = token_service(load_config(None).tokens)
    token, exp = tokens.issue(VM)
    assert tokens.verify(token, VM) == exp


def test_every_vmm_setting_is_configurable() -> None:
    names = {f.name for f in fields(VmmSettings)} - {"default_policy", "jail", "events"}
    assert names == set(config_module._VMM)


def test_every_jail_setting_is_configurable() -> None:
    assert {f.name for f in fields(JailSettings)} == set(config_module._JAIL)


def test_jail_table(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[jail]\nuid_start = 500000\nuid_count = 64\nlimits = false\n')
    assert (cfg.vmm.jail.uid_start, cfg.vmm.jail.uid_count, cfg.vmm.jail.limits) == (500000, 64, False)
    assert cfg.vmm.jail.enabled  # on by default
    with pytest.raises(ConfigError, match=r"^jail\.uid_start: must be"):
        load(tmp_path, "[jail]\nuid_start = 0\n")
    with pytest.raises(ConfigError, match=r"^jail\.cgroup_name"):
        load(tmp_path, '[jail]\ncgroup_name = "a/../b"\n')


def test_relative_paths_resolve_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load(tmp_path, '[server]\ntls_cert = "a/b.crt"\ntls_key = "/abs/k.key"\n[vmm]\nstate_dir = "st"\n')
    assert cfg.server.tls_cert == tmp_path / "a/b.crt"
    assert cfg.server.tls_key == Path("/abs/k.key")
    assert cfg.vmm.state_dir == tmp_path / "st"


def test_overrides(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
[server]
domain = "Edge.Example.COM."
tls = false
[proxy]
connect_timeout = 1
[policy]
idle_pause_after = 30
ports = [9000, 8081, 9000]
[vmm]
accelerator = "tcg"
on_shutdown = "suspend"
""",
    )
    assert cfg.server.domain == "edge.example.com" and cfg.server.control_host == "api.edge.example.com"
    assert cfg.server.tls is False
    assert cfg.proxy.connect_timeout == 1.0 and isinstance(cfg.proxy.connect_timeout, float)
    assert cfg.vmm.default_policy.idle_pause_after == 30 and cfg.vmm.default_policy.ports == (8081, 9000)
    assert cfg.vmm.accelerator == "tcg" and cfg.vmm.on_shutdown == "suspend"


EDDSA_ONLY_PUBLIC = """
[tokens]
active_kid = "ed"
[[tokens.keys]]
kid = "ed"
alg = "EdDSA"
public_key_file = "x.pem"
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[server]\nlisten_port = "x"', "server.listen_port: must be an integer in [1, 65535], got 'x'"),
        ("[server]\nlisten_port = 70000", "server.listen_port: must be an integer in [1, 65535]"),
        ("[server]\nlisen_port = 1", "server.lisen_port: unknown key"),
        ("[serer]\nlisten_port = 1", "serer: unknown key"),
        ("server = 3", "server: must be a table"),
        ('[server]\nadmin_key = "short"', "server.admin_key: the admin key must be at least 16"),
        ('[server]\ntls = "yes"', "server.tls: must be true or false"),
        ('[server]\ndomain = "bad domain"', "server.domain: must be a DNS name"),
        ('[server]\ncontrol_host = "-x"', "server.control_host: must be a DNS name"),
        ('[server]\nlisten_host = ""', "server.listen_host: must be a non-empty string"),
        ('[server]\ntls_cert = ""', "server.tls_cert: must be a path"),
        ("[server]\nlist_page_size = 0", "server.list_page_size: must be an integer in [1, 1000]"),
        ('[vmm]\nclone_ram = "copy"', "vmm.clone_ram: must be one of"),
        ("[vmm]\nmax_concurrent_restores = -1", "vmm.max_concurrent_restores: must be an integer"),
        ("[proxy]\nconnect_timeout = 0", "proxy.connect_timeout: must be a positive number"),
        ("[proxy]\nread_timeout = -1", "proxy.read_timeout: must be a positive number"),
        ("[proxy]\nwake_timeout = true", "proxy.wake_timeout: must be a positive number"),
        ("[proxy]\nmax_held_per_vm = 0", "proxy.max_held_per_vm: must be an integer"),
        ("[proxy]\nretry_after = 1.5", "proxy.retry_after: must be an integer"),
        ("[tokens]\ndefault_ttl = 7200", "tokens.default_ttl: must not exceed tokens.max_ttl"),
        ("[tokens]\nmax_ttl = 60", "tokens.default_ttl: must not exceed tokens.max_ttl"),
        ("[tokens]\nleeway = -1", "tokens.leeway: must be a number of seconds >= 0"),
        ('[tokens]\nactive_kid = "nope"', "tokens.active_kid: 'nope' is not the kid of any key"),
        ("[tokens]\nkeys = []", "tokens.keys: must be a non-empty list"),
        ("[tokens]\nkeys = 3", "tokens.keys: must be a non-empty list"),
        ("[tokens]\nkyes = 3", "tokens.kyes: unknown key"),
        ('[[tokens.keys]]\nkid = "dev-hs256"\nalg = "HS256"\nsecret = "short"', "tokens.keys[0].secret: must be"),
        ('[[tokens.keys]]\nkid = "dev-hs256"\nalg = "RS256"', "tokens.keys[0].alg: must be one of HS256"),
        ('[[tokens.keys]]\nalg = "HS256"', "tokens.keys[0].kid: missing"),
        ('[[tokens.keys]]\nkid = "dev-hs256"\nalg = "HS256"\nsecet = "x"', "tokens.keys[0].secet: unknown key"),
        ('[[tokens.keys]]\nkid = "dev-hs256"\nalg = "HS256"', "tokens.keys[0].secret: HS256 needs exactly one"),
        (
            '[[tokens.keys]]\nkid = "dev-hs256"\nalg = "HS256"\nsecret_file = "s"\nsecret = "' + "x" * 32 + '"',
            "tokens.keys[0].secret: HS256 needs exactly one",
        ),
        (
            '[[tokens.keys]]\nkid = "dev-hs256"\nalg = "HS256"\nsecret_file = "s"\npublic_key_file = "p"',
            "tokens.keys[0].public_key_file: only EdDSA and ES256",
        ),
        (
            '[[tokens.keys]]\nkid = "dev-hs256"\nalg = "HS256"\nsecret_file = "s"\n'
            '[[tokens.keys]]\nkid = "dev-hs256"\nalg = "HS256"\nsecret_file = "s"',
            "tokens.keys[1].kid: 'dev-hs256' is used by an earlier key",
        ),
        ('[[tokens.keys]]\nkid = "e"\nalg = "EdDSA"\nsecret_file = "s"', "tokens.keys[0].secret_file: EdDSA keys"),
        ('[[tokens.keys]]\nkid = "e"\nalg = "ES256"', "tokens.keys[0].private_key_file: ES256 needs"),
        (EDDSA_ONLY_PUBLIC, "tokens.active_kid: key 'ed' has no private_key_file"),
        ('[vmm]\naccelerator = "xen"', "vmm.accelerator: must be one of auto, kvm, tcg, got 'xen'"),
        ('[vmm]\non_shutdown = "stop"', "vmm.on_shutdown: must be one of keep, suspend"),
        ("[vmm]\nboot_timeout = 0", "vmm.boot_timeout: must be a positive number"),
        ("[vmm]\nbogus = 1", "vmm.bogus: unknown key"),
        ("[vmm]\ndefault_policy = {}", "vmm.default_policy: unknown key"),
        ('[proxy]\ntrusted_proxies = ["not-an-ip"]', "proxy.trusted_proxies: must be a list of IP addresses"),
        ('[proxy]\ntrusted_proxies = "10.0.0.1"', "proxy.trusted_proxies: must be a list"),
        ("[policy]\nvcpus = 0", "policy.vcpus"),
        ("[policy]\nbogus = 1", "policy.bogus: unknown key"),
        ("[policy]\nports = [0]", "policy.ports"),
        ("[reaper]\ninterval = 0", "reaper.interval: must be a positive number"),
        ('[log]\nlevel = "loud"', "log.level: must be one of debug, info, warning, error"),
        ('[server]\nlisten_host = "0.0.0.0"', "server.admin_key: replace the development default"),
        (
            '[server]\nlisten_host = "::"\nadmin_key = "a-real-admin-key-000"',
            "tokens.keys[0].secret: replace the development default",
        ),
        ("[server\n", "not valid TOML"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert message in str(info.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read"):
        load_config(tmp_path / "nope.toml")


def test_dev_secrets_are_fine_on_loopback(tmp_path: Path) -> None:
    for host in ("localhost", "::1", "127.0.0.2"):
        assert load(tmp_path, f'[server]\nlisten_host = "{host}"').server.listen_host == host


def test_admin_key_file(tmp_path: Path) -> None:
    (tmp_path / "admin.key").write_text("a-long-admin-key-from-a-file\n")
    cfg = load(tmp_path, f'[server]\nadmin_key_file = "{tmp_path / "admin.key"}"')
    assert cfg.server.admin_key == "a-long-admin-key-from-a-file"
    with pytest.raises(ConfigError, match=r"^server.admin_key_file: give admin_key or admin_key_file"):
        load(tmp_path, f'[server]\nadmin_key_file = "{tmp_path / "admin.key"}"\nadmin_key = "x"')
    with pytest.raises(ConfigError, match=r"^server.admin_key_file: cannot read"):
        load(tmp_path, f'[server]\nadmin_key_file = "{tmp_path / "missing"}"')
    (tmp_path / "short.key").write_text("short\n")
    with pytest.raises(ConfigError, match=r"^server.admin_key_file: the admin key must be at least 16"):
        load(tmp_path, f'[server]\nadmin_key_file = "{tmp_path / "short.key"}"')


def test_token_service_reads_key_files(tmp_path: Path) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ed.pem").write_bytes(pem)
    (tmp_path / "old.secret").write_text("o" * 40 + "\n")
    cfg = load(
        tmp_path,
        f"""
[tokens]
active_kid = "ed"
[[tokens.keys]]
kid = "ed"
alg = "EdDSA"
private_key_file = "{tmp_path / "ed.pem"}"
[[tokens.keys]]
kid = "old"
alg = "HS256"
secret_file = "{tmp_path / "old.secret"}"
""",
    )
    tokens = token_service(cfg.tokens)
    token, exp = tokens.issue(VM)
    assert tokens.verify(token, VM) == exp


@pytest.mark.parametrize(
    ("key_lines", "files", "message"),
    [
        ('alg = "HS256"\nsecret_file = "{d}/none"', {}, "tokens.keys[0].secret_file: cannot read"),
        ('alg = "HS256"\nsecret_file = "{d}/s"', {"s": b"short\n"}, "tokens.keys[0].secret_file: the secret"),
        ('alg = "EdDSA"\nprivate_key_file = "{d}/none"', {}, "tokens.keys[0].private_key_file: cannot read"),
        ('alg = "EdDSA"\nprivate_key_file = "{d}/p"', {"p": b"junk"}, "tokens.keys: kid 'k': the private key"),
    ],
)
def test_token_service_errors(tmp_path: Path, key_lines: str, files: dict[str, bytes], message: str) -> None:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    text = '[tokens]\nactive_kid = "k"\n[[tokens.keys]]\nkid = "k"\n' + key_lines.format(d=tmp_path)
    cfg = load(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        token_service(cfg.tokens)
    assert str(info.value).startswith(message)


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def test_trusted_proxies_are_networks(tmp_path: Path) -> None:
    from edge.proxy_context import ProxySettings

    cfg = load_config(None)
    assert cfg.proxy.trusted_proxies == ()
    assert load(tmp_path, '[proxy]\ntrusted_proxies = ["10.1.0.0/16"]').proxy.trusts(b"10.1.2.3")
    settings = ProxySettings(trusted_proxies=(ipaddress.ip_network("10.1.0.0/16"),))
    assert settings.trusts(b"10.1.2.3") and not settings.trusts(b"10.2.0.1") and not settings.trusts(b"garbage")
    assert not ProxySettings().trusts(b"127.0.0.1")


def test_dev_toml_lists_every_server_and_proxy_knob() -> None:
    import tomllib

    data = tomllib.loads(DEV_TOML.read_text())
    assert set(data["server"]) | {"admin_key_file"} == set(config_module._SERVER) | {"admin_key_file"}
    assert set(data["proxy"]) == set(config_module._PROXY)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[proxy]\nidle_timeout = 0", "proxy.idle_timeout: must be a positive number"),
        ('[server]\nper_vm_metrics = "yes"', "server.per_vm_metrics: must be"),
        ("[proxy]\nmax_head_size = 10", "proxy.max_head_size: must be an integer"),
        ("[proxy]\nmax_headers = 0", "proxy.max_headers: must be an integer"),
        ("[proxy]\nbody_timeout = -1", "proxy.body_timeout: must be a number of seconds >= 0"),
        ("[proxy]\nbody_min_rate = 1.5", "proxy.body_min_rate: must be an integer"),
        ("[proxy]\nbody_rate_grace = \"x\"", "proxy.body_rate_grace: must be a number"),
        ("[proxy]\nmax_connections_per_ip = -1", "proxy.max_connections_per_ip: must be an integer"),
        ("[server]\nrlimit_nofile = true", "server.rlimit_nofile: must be an integer"),
        ("[server]\ndrain_timeout = -2", "server.drain_timeout: must be a number of seconds >= 0"),
    ],
)
def test_limit_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert str(info.value).startswith(message)


def test_limits_are_configurable(tmp_path: Path) -> None:
    text = "[proxy]\nmax_headers = 20\nbody_min_rate = 512\n[server]\nrlimit_nofile = 0\ndrain_timeout = 3\n"
    cfg = load(tmp_path, text)
    assert cfg.proxy.max_headers == 20 and cfg.proxy.body_min_rate == 512
    assert cfg.server.rlimit_nofile == 0 and cfg.server.drain_timeout == 3.0


def test_http2_table(tmp_path: Path) -> None:
    cfg = load(tmp_path, "[http2]\nh2c = true\nmax_resets = 10\nflood_window = 2\n")
    assert cfg.proxy.http2 == Http2Settings(h2c=True, max_resets=10, flood_window=2.0)
    assert {f.name for f in fields(Http2Settings)} == set(config_module._HTTP2)
    with pytest.raises(ConfigError, match=r"^http2\.max_concurrent_streams: must be an integer"):
        load(tmp_path, "[http2]\nmax_concurrent_streams = 0\n")
    with pytest.raises(ConfigError, match=r"^http2\.max_frame_sizes: unknown key"):
        load(tmp_path, "[http2]\nmax_frame_sizes = 20000\n")
