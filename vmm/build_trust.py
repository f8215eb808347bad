"""What a build's RUN steps borrow from the host: its CA bundle, its proxies, its package indexes.

A developer's machine often reaches PyPI and npm through a proxy that re-signs TLS with a CA
only the host trusts (Debian's /usr/local/share/ca-certificates, SSL_CERT_FILE, PIP_CERT, ...).
A RUN step sees only the image's own trust store, so `pip install` fails there. So, by default,
every RUN step gets, for that step only:
- the host's CA bundle (plus `build.ca_files`), read-only at /run/mvm-host-trust/ca.pem, and
  the usual CA variables (SSL_CERT_FILE, PIP_CERT, NODE_EXTRA_CA_CERTS, ...) pointing at it;
- the host's proxy variables, in both cases;
- the host's package indexes: pip's index-url and extra-index-url, npm's registry (http(s) only:
  a file:// index of the host means nothing inside the build).

How none of it reaches the image:
- /run/mvm-host-trust is one of buildah's per-RUN "subscription" mounts (--default-mounts-file),
  which buildah removes from the container before it commits the step's layer; the bundle and
  the index files are read-only bind mounts inside it, so no mount point is left either.
- The proxies go through buildah's own proxy pass-through, which keeps them out of the image
  and its history.
- The CA and index variables are ARGs with defaults, added after each FROM of a copy of the
  Dockerfile: an ARG reaches RUN steps but never the image config. buildah's layer cache records
  their names and paths (never the bundle, a proxy or an index URL) in its history, as the
  cache key. The progress hides those added steps and numbers steps as the user's Dockerfile does.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidRequest

TRUST_DIR = "/run/mvm-host-trust"
BUNDLE = f"{TRUST_DIR}/ca.pem"
PIP_CONF = f"{TRUST_DIR}/pip.conf"
NPMRC = f"{TRUST_DIR}/npmrc"
CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT", "NODE_EXTRA_CA_CERTS",
                "GIT_SSL_CAINFO")  # fmt: skip
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
HOST_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")
PIP_CONFIG_FILES = ("/etc/pip.conf", "/etc/xdg/pip/pip.conf", "~/.config/pip/pip.conf", "~/.pip/pip.conf")
NPMRC_FILES = ("/etc/npmrc", "/usr/etc/npmrc", "~/.npmrc")
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_ARG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class BuildSettings:
    """`[build]` in the config: what every `mvm image build` gets, unless its flags say otherwise."""

    host_trust: bool = True  # RUN steps trust the host's CAs and use its proxies and package indexes
    ca_files: tuple[Path, ...] = ()  # more PEM files for the bundle RUN steps trust
    args: dict[str, str] = field(default_factory=dict)  # --build-arg KEY=VALUE for every build


@dataclass(frozen=True)
class HostTrust:
    """The host's trust and network settings, as RUN steps will see them."""

    bundle: bytes  # PEM: the host's bundle, then the extra CA files
    sources: tuple[str, ...]  # where the bundle came from
    proxies: dict[str, str]  # both cases of each variable the host sets
    pip_index: dict[str, str]  # index-url, extra-index-url
    npm_registry: str

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.bundle).hexdigest()

    @property
    def https_proxy(self) -> str:
        return self.proxies.get("HTTPS_PROXY", "")

    def describe(self) -> str:
        """One progress line: what RUN steps get."""
        certs = len(_PEM_CERT.findall(self.bundle))
        proxy = self.https_proxy or self.proxies.get("HTTP_PROXY", "") or "none"
        index = self.pip_index.get("index-url", "") or "default"
        return (f"host trust for RUN steps: {certs} CA certificates from {' + '.join(self.sources)} "
                f"(sha256 {self.fingerprint[:16]}), proxy {redact(proxy)}, pip index {redact(index)}, "
                f"npm registry {redact(self.npm_registry) or 'default'}")  # fmt: skip

    def variables(self) -> dict[str, str]:
        """The ARG defaults added after each FROM: paths under TRUST_DIR only, never a value of the host."""
        values = dict.fromkeys(CA_VARIABLES, BUNDLE)
        if self.pip_index:
            values["PIP_CONFIG_FILE"] = PIP_CONF
        if self.npm_registry:
            values["NPM_CONFIG_GLOBALCONFIG"] = NPMRC
        return values

    def files(self) -> dict[str, bytes]:
        """What is mounted under TRUST_DIR, by name."""
        files = {"ca.pem": self.bundle}
        if self.pip_index:
            files["pip.conf"] = ("[global]\n" + "".join(f"{k} = {v}\n" for k, v in self.pip_index.items())).encode()
        if self.npm_registry:
            files["npmrc"] = f"registry={self.npm_registry}\n".encode()
        return files


def from_host(environ: Mapping[str, str], ca_files: tuple[Path, ...] = ()) -> HostTrust:
    """What this host trusts and uses: $SSL_CERT_FILE or the system bundle, its proxies, its indexes."""
    bundle_path = _host_bundle(environ)
    parts = [bundle_path.read_bytes()]
    sources = [str(bundle_path)]
    for extra in ca_files:
        try:
            data = Path(extra).read_bytes()
        except OSError as exc:
            raise InvalidRequest(f"build.ca_files: cannot read {extra}: {exc.strerror}") from None
        if not _PEM_CERT.search(data):
            raise InvalidRequest(f"build.ca_files: {extra} holds no PEM certificate")
        parts.append(data)
        sources.append(str(extra))
    bundle = b"".join(part if part.endswith(b"\n") else part + b"\n" for part in parts)
    return HostTrust(bundle, tuple(sources), proxies(environ), pip_index(environ), npm_registry(environ))


def _host_bundle(environ: Mapping[str, str]) -> Path:
    candidates = [environ.get("SSL_CERT_FILE", ""), environ.get("REQUESTS_CA_BUNDLE", ""), *HOST_BUNDLES]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise InvalidRequest(
        f"host trust: no CA bundle on this host (SSL_CERT_FILE, {', '.join(HOST_BUNDLES)}); "
        "install ca-certificates or build with --no-host-trust"
    )


def proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """HTTP_PROXY, HTTPS_PROXY, NO_PROXY from either case (upper wins), given in both cases."""
    found = {}
    for name in PROXY_VARIABLES:
        value = environ.get(name) or environ.get(name.lower())
        if value:
            found[name] = found[name.lower()] = value
    return found


def pip_index(environ: Mapping[str, str]) -> dict[str, str]:
    """pip's index-url and extra-index-url: the environment, else pip's config files; http(s) URLs only."""
    settings = {
        "index-url": environ.get("PIP_INDEX_URL", ""),
        "extra-index-url": environ.get("PIP_EXTRA_INDEX_URL", ""),
    }
    files = [*PIP_CONFIG_FILES, environ.get("PIP_CONFIG_FILE", "")]  # in pip's order: the last one wins
    for key in settings:
        if settings[key]:
            continue
        for name in files:
            value = _ini_value(_expand(name, environ), key) if name else ""
            if value:
                settings[key] = value
    kept = {key: " ".join(url for url in value.split() if _is_http(url)) for key, value in settings.items()}
    return {key: value for key, value in kept.items() if value}


def npm_registry(environ: Mapping[str, str]) -> str:
    """npm's registry: the environment, else the host's npmrc files; an http(s) URL or ''."""
    value = environ.get("npm_config_registry") or environ.get("NPM_CONFIG_REGISTRY") or ""
    for name in NPMRC_FILES:
        if value:
            break
        value = _npmrc_value(_expand(name, environ), "registry")
    return value if _is_http(value) else ""


def _expand(name: str, environ: Mapping[str, str]) -> str:
    """`~/x` under the HOME of `environ` (the host's, or a test's)."""
    home = environ.get("HOME") or os.path.expanduser("~")
    return home + name[1:] if name.startswith("~/") else name


def _ini_value(name: str, key: str) -> str:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(name, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError):
        return ""
    for section in ("global", "install"):
        if parser.has_option(section, key):
            return " ".join(parser.get(section, key).split())
    return ""


def _npmrc_value(name: str, key: str) -> str:
    try:
        lines = Path(name).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return ""
    for line in lines:
        k, sep, v = line.partition("=")
        if sep and k.strip() == key:
            return v.strip()
    return ""


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://")) and not any(c.isspace() or c in "\"'\\$" for c in url)


def redact(url: str) -> str:
    """A URL without its password, for progress and error lines."""
    return re.sub(r"(://[^/:@]+):[^/@]*@", r"\1:***@", url)


def check_build_args(args: Mapping[str, str], where: str) -> dict[str, str]:
    """--build-arg names are ARG names; values are single lines."""
    for name, value in args.items():
        if not isinstance(name, str) or not _ARG_NAME.match(name):
            raise InvalidRequest(f"{where}: {name!r} is not a build argument name")
        if not isinstance(value, str) or "\n" in value or "\0" in value:
            raise InvalidRequest(f"{where}.{name}: must be a one-line string")
    return dict(args)


def with_trust_args(dockerfile: str, variables: Mapping[str, str]) -> tuple[str, int]:
    """The Dockerfile with `ARG k=v ...` after each FROM instruction, and how many it added.

    Continuation lines (the escape directive's character, `\\` by default), comments and blank
    lines are followed, so the ARG lands after the FROM instruction's last line.
    """
    if not variables:
        return dockerfile, 0
    arg_line = "ARG " + " ".join(f"{k}={v}" for k, v in variables.items()) + "\n"
    lines = dockerfile.splitlines(keepends=True)
    escape = "\\"
    for line in lines:
        directive = re.match(r"#\s*([A-Za-z]+)\s*=\s*(\S+)\s*$", line.strip())
        if directive is None:
            break
        if directive.group(1).lower() == "escape":
            escape = directive.group(2)
    out: list[str] = []
    in_from = continued = False
    added = 0
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            out.append(line)
            continue
        if not continued:
            in_from = stripped.split(None, 1)[0].upper() == "FROM"
        out.append(line if line.endswith("\n") else line + "\n")
        continued = stripped.endswith(escape)
        if in_from and not continued:
            out.append(arg_line)
            added += 1
            in_from = False
    return "".join(out), added


@dataclass(frozen=True)
class Mounts:
    """buildah arguments that mount the trust files: `before` goes before `build`, `after` after it."""

    before: list[str]
    after: list[str]


@contextmanager
def staged(trust: HostTrust, scratch: Path) -> Iterator[Mounts]:
    """The trust files under `scratch` (a new directory, removed afterwards), and how to mount them."""
    scratch.mkdir(mode=0o755)
    try:
        subscription = scratch / "subscription"  # empty: buildah copies it per RUN step, then removes it
        subscription.mkdir(mode=0o755)
        (scratch / "mounts.conf").write_text(f"{subscription}:{TRUST_DIR}\n")
        volumes = []
        for name, data in trust.files().items():
            path = scratch / name
            path.write_bytes(data)
            path.chmod(0o644)
            volumes += ["-v", f"{path}:{TRUST_DIR}/{name}:ro"]
        yield Mounts(["--default-mounts-file", str(scratch / "mounts.conf")], volumes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
