"""The edge's settings: the [server], [tokens], [reaper] and [log] sections of the one TOML file.

`mvm.config` reads and validates the file into these; the data plane and the control API take
them through `EdgeConfig`, so edge/ never depends on how the file is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from vmm.errors import ConfigError
from vmm.settings import VmmSettings

from .proxy_context import ProxySettings
from .tokens import MIN_SECRET_BYTES, SigningKey, TokenService

DEV_ADMIN_KEY = "dev-admin-key-change-me"
DEV_SECRET = "dev-secret-change-me-0123456789abcdef"


@dataclass(frozen=True)
class ServerConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8443
    domain: str = "mvm.localhost"
    control_host: str = ""  # "" -> "api.<domain>"
    tls: bool = True
    tls_cert: Path = Path("var/tls/dev.crt")
    tls_key: Path = Path("var/tls/dev.key")
    admin_key: str = field(default=DEV_ADMIN_KEY, repr=False)
    rlimit_nofile: int = 65536  # soft RLIMIT_NOFILE wanted at start (capped by the hard limit); 0: leave it
    drain_timeout: float = 10.0  # on SIGTERM: how long requests in flight may take to finish
    workers: int = 0  # edge worker processes (SO_REUSEPORT); 0: one per core; 1: serve in one process
    worker_user: str = "mvm-edge"  # edge workers started as root become this user; "": they stay as started
    per_vm_metrics: bool = False  # /metrics: mvm_vm_*{vm} series per VM (one set per VM: off for cardinality)
    console_session_ttl: float = 8 * 3600.0  # seconds a web console sign-in lasts
    list_page_size: int = 200  # VMs per page of GET /v1/vms when the request gives no `limit`


@dataclass(frozen=True)
class KeyConfig:
    """One [[tokens.keys]] entry; files are read by token_service(), not at load time."""

    kid: str
    alg: str
    secret: str | None = field(default=None, repr=False)
    secret_file: Path | None = None
    private_key_file: Path | None = None
    public_key_file: Path | None = None


@dataclass(frozen=True)
class TokensConfig:
    default_ttl: float = 300.0
    max_ttl: float = 3600.0
    active_kid: str = "dev-hs256"
    cache_size: int = 10_000
    issuer: str = "microvm-edge"
    leeway: float = 0.0
    keys: tuple[KeyConfig, ...] = (KeyConfig(kid="dev-hs256", alg="HS256", secret=DEV_SECRET),)


@dataclass(frozen=True)
class ReaperConfig:
    interval: float = 1.0


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


class EdgeConfig(Protocol):
    """What an edge (one process, or a worker of a fleet) reads of the whole configuration."""

    @property
    def server(self) -> ServerConfig: ...
    @property
    def proxy(self) -> ProxySettings: ...
    @property
    def tokens(self) -> TokensConfig: ...
    @property
    def vmm(self) -> VmmSettings: ...
    @property
    def reaper(self) -> ReaperConfig: ...
    @property
    def log(self) -> LogConfig: ...


def token_service(tokens: TokensConfig) -> TokenService:
    """The TokenService for [tokens], reading secret and PEM files now (start-up, not load time)."""
    keys = [_signing_key(key, f"tokens.keys[{i}]") for i, key in enumerate(tokens.keys)]
    try:
        return TokenService(
            keys,
            tokens.active_kid,
            default_ttl=tokens.default_ttl,
            max_ttl=tokens.max_ttl,
            cache_size=tokens.cache_size,
            issuer=tokens.issuer,
            leeway=tokens.leeway,
        )
    except ValueError as e:
        raise ConfigError(f"tokens.keys: {e}") from None


def _signing_key(key: KeyConfig, where: str) -> SigningKey:
    secret: bytes | None = key.secret.encode() if key.secret is not None else None
    if key.secret_file is not None:
        secret = read_config_file(key.secret_file, f"{where}.secret_file").strip()
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"{where}.secret_file: the secret must be at least {MIN_SECRET_BYTES} bytes")
    private, public = key.private_key_file, key.public_key_file
    return SigningKey(
        kid=key.kid,
        alg=key.alg,
        secret=secret,
        private_key=read_config_file(private, f"{where}.private_key_file") if private else None,
        public_key=read_config_file(public, f"{where}.public_key_file") if public else None,
    )


def read_config_file(path: Path, key: str) -> bytes:
    """A file a config key names; an unreadable one is a ConfigError naming that key."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None
