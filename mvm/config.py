"""The one TOML file every `mvm` role reads, validated whole at start-up.

Every error names its key (`server.listen_port: ...`) and unknown keys are errors, so a
typo fails loudly instead of silently keeping a default. Every default works on one
machine; configs/dev.toml spells out the same values. Each section fills the settings
dataclass of the layer it configures (vmm, edge, fleet); `Config` holds them all.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edge.h2_settings import Http2Settings
from edge.proxy_context import ProxySettings
from edge.settings import (
    DEV_ADMIN_KEY,
    DEV_SECRET,
    KeyConfig,
    LogConfig,
    ReaperConfig,
    ServerConfig,
    TokensConfig,
    read_config_file,
)
from edge.tokens import ALGORITHMS, MIN_SECRET_BYTES
from fleet.settings import DEV_CLUSTER_SECRET, MIN_CLUSTER_SECRET, CatalogConfig, ClusterConfig
from vmm.build_trust import BuildSettings, check_build_args
from vmm.errors import ConfigError, InvalidRequest
from vmm.events import EVENT_TYPES, EventsSettings, Webhook
from vmm.policy import Policy
from vmm.settings import JailSettings, VmmSettings

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

DEFAULT_POLICY = Policy(ports=(8081,))
LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_ADMIN_KEY = 16
MIN_WEBHOOK_SECRET = 16


@dataclass(frozen=True)
class Config:
    """The whole file; it is an `edge.settings.EdgeConfig` and a `fleet.settings.FleetConfig`."""

    server: ServerConfig
    proxy: ProxySettings
    tokens: TokensConfig
    vmm: VmmSettings
    reaper: ReaperConfig
    log: LogConfig
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    build: BuildSettings = field(default_factory=BuildSettings)


T = TypeVar("T", bound="DataclassInstance")
Rule = Callable[[Any, str], Any]  # (value, key) -> the value to keep; raises ConfigError


def _fail(key: str, rule: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}: must be {rule}, got {value!r}")


def _integer(low: int, high: int) -> Rule:
    def check(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _fail(key, f"an integer in [{low}, {high}]", value)
        return value

    return check


def _seconds(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise _fail(key, "a positive number of seconds", value)
    return float(value)


def _seconds_or_zero(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise _fail(key, "a number of seconds >= 0", value)
    return float(value)


def _fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise _fail(key, "a number in (0, 1]", value)
    return float(value)


def _networks(value: Any, key: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """A list of IP addresses or CIDR networks (already parsed: a loaded config's are networks)."""
    if not isinstance(value, list | tuple):
        raise _fail(key, 'a list of IP addresses or networks such as "10.0.0.0/8"', value)
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except (TypeError, ValueError):
            raise _fail(key, 'a list of IP addresses or networks such as "10.0.0.0/8"', item) from None
    return tuple(networks)


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(key, "a non-empty string", value)
    return value


def _text_or_empty(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _fail(key, "a string", value)
    return value


_HOST_ID = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _host_id(value: Any, key: str) -> str:
    if value != "" and (not isinstance(value, str) or not _HOST_ID.fullmatch(value)):
        raise _fail(key, 'a host name of lower-case letters, digits and dashes (or "" for the hostname)', value)
    return str(value)


def _address(value: Any, key: str) -> str:
    """host:port, with the port a number; IPv6 in brackets."""
    host, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise _fail(key, "an address host:port such as 127.0.0.1:9100", value)
    return str(value)


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, "true or false", value)
    return value


def _choice(*options: str) -> Rule:
    def check(value: Any, key: str) -> str:
        if value not in options:
            raise _fail(key, "one of " + ", ".join(options), value)
        return str(value)

    return check


def _path(value: Any, key: str) -> Path:
    """Relative paths resolve against the working directory of `mvm serve`."""
    if not isinstance(value, str | Path) or not str(value):
        raise _fail(key, "a path (string)", value)
    return Path(value).absolute()


_DNS_NAME = re.compile(r"(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


def _dns_name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not _DNS_NAME.fullmatch(value.lower().rstrip(".")):
        raise _fail(key, "a DNS name such as mvm.example.com", value)
    return value.lower().rstrip(".")


def _dns_name_or_empty(value: Any, key: str) -> str:
    return "" if value == "" else _dns_name(value, key)


_SERVER: dict[str, Rule] = {
    "listen_host": _text,
    "listen_port": _integer(1, 65535),
    "domain": _dns_name,
    "control_host": _dns_name_or_empty,
    "tls": _flag,
    "tls_cert": _path,
    "tls_key": _path,
    "admin_key": _text,
    "rlimit_nofile": _integer(0, 1 << 30),
    "drain_timeout": _seconds_or_zero,
    "workers": _integer(0, 1024),
    "worker_user": _text_or_empty,
    "per_vm_metrics": _flag,
    "console_session_ttl": _seconds,
    "list_page_size": _integer(1, 1000),
}
_PROXY: dict[str, Rule] = {
    "connect_timeout": _seconds,
    "read_timeout": _seconds,
    "wake_timeout": _seconds,
    "max_held_per_vm": _integer(1, 1_000_000),
    "upstream_keepalive_per_vm": _integer(0, 10_000),
    "upstream_keepalive_idle": _seconds,
    "retry_after": _integer(0, 3600),
    "idle_timeout": _seconds,
    "max_head_size": _integer(1024, 1 << 24),
    "max_headers": _integer(1, 10_000),
    "body_timeout": _seconds_or_zero,
    "body_min_rate": _integer(0, 1 << 30),
    "body_rate_grace": _seconds_or_zero,
    "max_connections_per_ip": _integer(0, 1_000_000),
    "trusted_proxies": lambda value, key: _networks(value, key),
}
_TOKENS: dict[str, Rule] = {
    "default_ttl": _seconds,
    "max_ttl": _seconds,
    "active_kid": _text,
    "cache_size": _integer(0, 10_000_000),
    "issuer": _text,
    "leeway": _seconds_or_zero,
}
_KEY: dict[str, Rule] = {
    "kid": _text,
    "alg": _choice(*ALGORITHMS),
    "secret": _text,
    "secret_file": _path,
    "private_key_file": _path,
    "public_key_file": _path,
}
_VMM: dict[str, Rule] = {
    "state_dir": _path,
    "accelerator": _choice("auto", "kvm", "tcg"),
    "qemu_binary": _text,
    "boot_timeout": _seconds,
    "restore_timeout": _seconds,
    "on_shutdown": _choice("keep", "suspend"),
    "default_template": _text,
    "default_image": _text,
    "app_log_max_bytes": _integer(4096, 1 << 30),
    "agent_timeout": _seconds,
    "guest_sync": _flag,
    "max_lifetime_cap": _seconds,
    "terminated_ttl": _seconds,
    "verify_ram": _flag,
    "memory_reserve_mb": _integer(0, 1 << 30),
    "max_concurrent_restores": _integer(0, 4096),
    "clone_ram": _choice("cow", "reflink"),
    "max_checkpoints": _integer(1, 1024),
    "checkpoint_max_mb": _integer(16, 1 << 24),
    "max_chain_depth": _integer(2, 32),
}
_JAIL: dict[str, Rule] = {
    "enabled": _flag,
    "uid_start": _integer(1000, (1 << 31) - 1_000_000),
    "uid_count": _integer(1, 1_000_000),
    "lease_dir": _path,
    "root_dir": _path,
    "limits": _flag,
    "cgroup_name": lambda value, key: _host_id(_text(value, key), key),
    "memory_overhead_mb": _integer(16, 1 << 20),
    "pids_max": _integer(16, 1 << 22),
    "io_weight": _integer(1, 10_000),
    "host_cpu_weight": _integer(1, 10_000),
    "busy_cpu_weight": _integer(0, 10_000),
    "busy_share": _fraction,
    "busy_after": _seconds,
}
_CATALOG: dict[str, Rule] = {"url": _text_or_empty}
_CLUSTER: dict[str, Rule] = {
    "secret": _text,
    "host_id": _host_id,
    "host_listen": _address,
    "data_listen": _address,
    "advertise": lambda value, key: "" if value == "" else _address(value, key),
    "heartbeat_interval": _seconds,
    "down_after": _seconds,
    "direct": _flag,
    "tls": _flag,
    "ca_file": _path,
    "host_cert": _path,
    "host_key": _path,
    "edge_cert": _path,
    "edge_key": _path,
}


def _paths(value: Any, key: str) -> tuple[Path, ...]:
    if not isinstance(value, list | tuple):
        raise _fail(key, "a list of paths", value)
    return tuple(_path(item, key) for item in value)


def _build_args(value: Any, key: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _fail(key, "a table of NAME = \"value\"", value)
    try:
        return check_build_args(value, key)
    except InvalidRequest as e:
        raise ConfigError(str(e)) from None


_BUILD: dict[str, Rule] = {"host_trust": _flag, "ca_files": _paths, "args": _build_args}
_REAPER: dict[str, Rule] = {"interval": _seconds}
_HTTP2: dict[str, Rule] = {
    "enabled": _flag,
    "h2c": _flag,
    "max_concurrent_streams": _integer(1, 100_000),
    "max_header_list_size": _integer(1024, 16 * 1024 * 1024),
    "max_continuation_frames": _integer(1, 1024),
    "max_frame_size": _integer(16384, 16_777_215),
    "stream_window": _integer(65535, 2**31 - 1),
    "connection_window": _integer(65535, 2**31 - 1),
    "stream_buffer": _integer(16384, 1 << 30),
    "max_resets": _integer(1, 1_000_000),
    "max_settings": _integer(1, 1_000_000),
    "max_pings": _integer(1, 1_000_000),
    "max_window_updates": _integer(1, 10_000_000),
    "flood_window": _seconds,
    "body_idle_timeout": _seconds,
    "stall_timeout": _seconds,
    "idle_timeout": _seconds,
}
_LOG: dict[str, Rule] = {"level": _choice(*LOG_LEVELS)}
_EVENTS: dict[str, Rule] = {
    "retain_count": _integer(1, 10_000_000),
    "retain_seconds": _seconds,
    "keepalive": _seconds,
    "webhook_queue": _integer(1, 10_000_000),
    "webhook_attempts": _integer(1, 100),
    "webhook_backoff": _seconds,
    "webhook_timeout": _seconds,
}
_SECTIONS = (
    "server", "proxy", "http2", "tokens", "vmm", "jail", "policy", "reaper", "log", "catalog", "cluster", "build",
    "events",
)  # fmt: skip


def load_config(path: Path | None) -> Config:
    """Read and validate `path`; None gives the built-in defaults (those of configs/dev.toml)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); TOML files must be UTF-8") from None
    _reject_unknown(data, "", _SECTIONS)
    server = _server(_table(data, "server"))
    tokens = _tokens(_table(data, "tokens"))
    _check_dev_secrets(server, tokens)
    vmm = _section(_table(data, "vmm"), "vmm", VmmSettings(), _VMM)
    try:
        policy = Policy.from_dict(
            _table(data, "policy"), base=DEFAULT_POLICY, where="policy", max_lifetime_cap=vmm.max_lifetime_cap
        )
    except InvalidRequest as e:
        raise ConfigError(str(e)) from None
    return Config(
        server=server,
        proxy=replace(
            _section(_table(data, "proxy"), "proxy", ProxySettings(), _PROXY),
            forwarded_proto="https" if server.tls else "http",
            http2=_section(_table(data, "http2"), "http2", Http2Settings(), _HTTP2),
        ),
        tokens=tokens,
        vmm=replace(
            vmm, default_policy=policy, jail=_section(_table(data, "jail"), "jail", JailSettings(), _JAIL),
            events=_events(_table(data, "events")),
        ),
        reaper=_section(_table(data, "reaper"), "reaper", ReaperConfig(), _REAPER),
        log=_section(_table(data, "log"), "log", LogConfig(), _LOG),
        catalog=_section(_table(data, "catalog"), "catalog", CatalogConfig(), _CATALOG),
        cluster=_cluster(_table(data, "cluster")),
        build=_section(_table(data, "build"), "build", BuildSettings(), _BUILD),
    )


def _table(data: dict[str, Any], name: str) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{name}: must be a table ([{name}]), got {table!r}")
    return table


def _reject_unknown(table: dict[str, Any], where: str, known: Iterable[str]) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(known))})")


def _section(table: dict[str, Any], where: str, defaults: T, rules: dict[str, Rule]) -> T:
    """`defaults` updated from `table`: each key given, or its default, passes through its rule."""
    _reject_unknown(table, where, rules)
    values = {}
    for name, rule in rules.items():
        value = table.get(name, getattr(defaults, name))
        values[name] = None if value is None else rule(value, f"{where}.{name}")
    return replace(defaults, **values)


def _server(table: dict[str, Any]) -> ServerConfig:
    _reject_unknown(table, "server", [*_SERVER, "admin_key_file"])
    table = dict(table)
    key_file = table.pop("admin_key_file", None)
    if key_file is not None:
        if "admin_key" in table:
            raise ConfigError("server.admin_key_file: give admin_key or admin_key_file, not both")
        path = _path(key_file, "server.admin_key_file")
        try:
            table["admin_key"] = read_config_file(path, "server.admin_key_file").decode().strip()
        except UnicodeDecodeError:
            raise ConfigError(f"server.admin_key_file: {path} is not UTF-8 text") from None
    server = _section(table, "server", ServerConfig(), _SERVER)
    if len(server.admin_key) < MIN_ADMIN_KEY:
        where = "server.admin_key_file" if key_file is not None else "server.admin_key"
        raise ConfigError(f"{where}: the admin key must be at least {MIN_ADMIN_KEY} characters")
    if not server.control_host:
        server = replace(server, control_host=f"api.{server.domain}")
    return server


def _tokens(table: dict[str, Any]) -> TokensConfig:
    _reject_unknown(table, "tokens", [*_TOKENS, "keys"])
    table = dict(table)
    raw_keys = table.pop("keys", None)
    tokens = _section(table, "tokens", TokensConfig(), _TOKENS)
    if raw_keys is not None:
        if not isinstance(raw_keys, list) or not raw_keys:
            raise ConfigError("tokens.keys: must be a non-empty list of [[tokens.keys]] tables")
        tokens = replace(tokens, keys=tuple(_key(k, f"tokens.keys[{i}]") for i, k in enumerate(raw_keys)))
    if tokens.default_ttl > tokens.max_ttl:
        raise ConfigError(
            f"tokens.default_ttl: must not exceed tokens.max_ttl ({tokens.max_ttl:g}), got {tokens.default_ttl:g}"
        )
    kids = [k.kid for k in tokens.keys]
    for i, kid in enumerate(kids):
        if kid in kids[:i]:
            raise ConfigError(f"tokens.keys[{i}].kid: {kid!r} is used by an earlier key")
    if tokens.active_kid not in kids:
        raise ConfigError(f"tokens.active_kid: {tokens.active_kid!r} is not the kid of any key (have: {kids})")
    active = tokens.keys[kids.index(tokens.active_kid)]
    if active.alg != "HS256" and active.private_key_file is None:
        raise ConfigError(f"tokens.active_kid: key {active.kid!r} has no private_key_file to sign with")
    return tokens


def _key(table: Any, where: str) -> KeyConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table, got {table!r}")
    for name in ("kid", "alg"):
        if name not in table:
            raise ConfigError(f"{where}.{name}: missing")
    key = _section(table, where, KeyConfig(kid="", alg=""), _KEY)
    if key.alg == "HS256":
        if (key.secret is None) == (key.secret_file is None):
            raise ConfigError(f"{where}.secret: HS256 needs exactly one of secret and secret_file")
        if key.secret is not None and len(key.secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"{where}.secret: must be at least {MIN_SECRET_BYTES} bytes")
        for name in ("private_key_file", "public_key_file"):
            if getattr(key, name) is not None:
                raise ConfigError(f"{where}.{name}: only EdDSA and ES256 keys take PEM files")
    else:
        for name in ("secret", "secret_file"):
            if getattr(key, name) is not None:
                raise ConfigError(f"{where}.{name}: {key.alg} keys take PEM files, not a secret")
        if key.private_key_file is None and key.public_key_file is None:
            raise ConfigError(f"{where}.private_key_file: {key.alg} needs private_key_file and/or public_key_file")
    return key


def _events(table: dict[str, Any]) -> EventsSettings:
    _reject_unknown(table, "events", [*_EVENTS, "webhooks"])
    table = dict(table)
    hooks = table.pop("webhooks", [])
    if not isinstance(hooks, list):
        raise _fail("events.webhooks", "a list of {url, secret, types} tables", hooks)
    events = _section(table, "events", EventsSettings(), _EVENTS)
    return replace(events, webhooks=tuple(_webhook(hook, f"events.webhooks[{i}]") for i, hook in enumerate(hooks)))


def _webhook(table: Any, where: str) -> Webhook:
    if not isinstance(table, dict):
        raise _fail(where, "a table {url, secret, types}", table)
    _reject_unknown(table, where, ("url", "secret", "types"))
    url = table.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise _fail(f"{where}.url", "an http:// or https:// URL", url)
    secret = table.get("secret")
    if not isinstance(secret, str) or len(secret) < MIN_WEBHOOK_SECRET:
        raise ConfigError(f"{where}.secret: must be a string of at least {MIN_WEBHOOK_SECRET} characters")
    types = table.get("types", [])
    if not isinstance(types, list) or any(t not in EVENT_TYPES for t in types):
        raise _fail(f"{where}.types", "a list of event types (" + ", ".join(EVENT_TYPES) + ")", types)
    return Webhook(url, secret, frozenset(types))


def _cluster(table: dict[str, Any]) -> ClusterConfig:
    cluster = _section(table, "cluster", ClusterConfig(), _CLUSTER)
    if len(cluster.secret) < MIN_CLUSTER_SECRET:
        raise ConfigError(f"cluster.secret: must be at least {MIN_CLUSTER_SECRET} characters")
    listens = (cluster.host_listen, cluster.data_listen, cluster.advertise or cluster.host_listen)
    loopback = all(_is_loopback(a.rpartition(":")[0].strip("[]")) for a in listens)
    if not cluster.tls and not loopback:
        raise ConfigError(
            "cluster.tls: plaintext fleet traffic is allowed on loopback only (host_listen, data_listen, advertise);"
            " set cluster.tls = true with certificates from `mvm cluster init`"
        )
    if cluster.secret == DEV_CLUSTER_SECRET and not loopback:
        raise ConfigError("cluster.secret: replace the development default before a host listens beyond loopback")
    return cluster


def _check_dev_secrets(server: ServerConfig, tokens: TokensConfig) -> None:
    """The well-known dev secrets are fine on loopback only."""
    if _is_loopback(server.listen_host):
        return
    if server.admin_key == DEV_ADMIN_KEY:
        raise ConfigError("server.admin_key: replace the development default before listening beyond loopback")
    for i, key in enumerate(tokens.keys):
        if key.secret == DEV_SECRET:
            raise ConfigError(
                f"tokens.keys[{i}].secret: replace the development default before listening beyond loopback"
            )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
