"""Short-lived JWTs that open exactly one VM, and where requests carry them.

The key ring, not the token header, decides the algorithm of each `kid`, so `alg=none`
and HMAC-with-a-public-key confusion cannot pass. Verified tokens are cached until their
`exp` so the proxy's hot path is a dict lookup and two comparisons.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import jwt
from cachetools import TLRUCache
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from vmm.errors import InvalidRequest

COOKIE_NAME = "mvm_token"
ALGORITHMS = ("HS256", "EdDSA", "ES256")
MIN_SECRET_BYTES = 32
_MAX_TOKEN = 4096
_COOKIE_PREFIX = COOKIE_NAME.encode() + b"="


SCOPES = ("http", "exec", "files", "shell")
DEFAULT_SCOPES = frozenset({"http"})


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token opens: until `exp`, these scopes, on these ports (None: the VM's allow-list)."""

    exp: float
    scopes: frozenset[str] = DEFAULT_SCOPES
    ports: tuple[int, int] | None = None  # an inclusive range

    def allows_port(self, port: int) -> bool:
        return self.ports is None or self.ports[0] <= port <= self.ports[1]


def parse_ports(value: Any) -> tuple[int, int] | None:
    """A token's ports: "all", one port ("8080") or a range ("8000-8100")."""
    if value is None or value == "all":
        return None
    text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
    low, _, high = text.partition("-")
    if not low.isdigit() or (high and not high.isdigit()):
        raise InvalidRequest(f'ports must be "all", a port ("8080") or a range ("8000-8100"), got {value!r}')
    first, last = int(low), int(high or low)
    if not 1 <= first <= last <= 65535:
        raise InvalidRequest(f"ports {value!r}: must be within 1-65535, low to high")
    return first, last


def parse_scopes(value: Any) -> frozenset[str]:
    if value is None:
        return DEFAULT_SCOPES
    if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"scopes must be a non-empty list of {', '.join(SCOPES)}")
    unknown = sorted(set(value) - set(SCOPES))
    if unknown:
        raise InvalidRequest(f"scopes: unknown scope {unknown[0]!r} (known: {', '.join(SCOPES)})")
    return frozenset(value)


class TokenError(Exception):
    """A token was refused; `reason` is a short machine code, str() a sentence for humans."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SigningKey:
    """One key of the ring. HS256 uses `secret`; EdDSA (Ed25519) and ES256 (P-256) use PEM
    `private_key` to sign and `public_key` to verify (derived from the private key if absent).
    A verify-only key has only `public_key`.
    """

    kid: str
    alg: str
    secret: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    public_key: bytes | None = None


@dataclass(frozen=True, slots=True)
class _LoadedKey:
    alg: str
    signer: Any  # secret bytes or a cryptography private key; None for verify-only keys
    verifier: Any


class TokenService:
    """Issues and verifies VM-scoped tokens with a key ring: every kid verifies, one signs."""

    def __init__(
        self,
        keys: Sequence[SigningKey],
        active_kid: str,
        default_ttl: float = 300,
        max_ttl: float = 3600,
        cache_size: int = 10_000,
        issuer: str = "microvm-edge",
        leeway: float = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ring: dict[str, _LoadedKey] = {}
        for key in keys:
            if key.kid in self._ring:
                raise ValueError(f"kid {key.kid!r}: listed twice")
            self._ring[key.kid] = _load(key)
        active = self._ring.get(active_kid)
        if active is None:
            raise ValueError(f"active kid {active_kid!r} is not in the key ring")
        if active.signer is None:
            raise ValueError(f"active kid {active_kid!r} has no private key to sign with")
        if not 0 < default_ttl <= max_ttl:
            raise ValueError(f"default_ttl ({default_ttl}) must be in (0, max_ttl={max_ttl}]")
        self._active_kid = active_kid
        self._active = active
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self._issuer = issuer
        self._leeway = leeway
        self._clock = clock
        # Entries die at the token's exp: the cache never extends a token's life.
        self._cache: TLRUCache[str, tuple[str, Grant]] | None = (
            TLRUCache(cache_size, ttu=lambda _token, entry, _now: entry[1].exp, timer=clock) if cache_size else None
        )

    def issue(
        self, vm_id: str, ttl: float | None = None, scopes: Any = None, ports: Any = None
    ) -> tuple[str, float]:
        """A token for `vm_id` and its exp (unix time); `scopes` (default http) and `ports` (default all)."""
        granted, port_range = parse_scopes(scopes), parse_ports(ports)
        ttl = self.default_ttl if ttl is None else ttl
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= self.max_ttl:
            raise InvalidRequest(f"ttl must be a number of seconds in (0, {self.max_ttl:g}], got {ttl!r}")
        now = self._clock()
        exp = math.ceil(now + ttl)  # NumericDate as whole seconds, never shorter than asked
        claims = {
            "sub": vm_id,
            "aud": f"vm:{vm_id}",
            "iss": self._issuer,
            "iat": int(now),
            "exp": exp,
            "jti": secrets.token_urlsafe(12),
        }
        if granted != DEFAULT_SCOPES:
            claims["scp"] = sorted(granted)
        if port_range is not None:
            claims["ports"] = f"{port_range[0]}-{port_range[1]}"
        token = jwt.encode(claims, self._active.signer, algorithm=self._active.alg, headers={"kid": self._active_kid})
        return token, float(exp)

    def still_valid(self, grant: Grant) -> bool:
        """A grant this service gave is still within its token's life (for a caller that keeps it,
        as the cache here does)."""
        return self._clock() < grant.exp

    def verify(self, token: str, vm_id: str) -> float:
        """The token's exp if it is valid now for `vm_id`; otherwise raises TokenError."""
        return self.grant(token, vm_id).exp

    def grant(self, token: str, vm_id: str) -> Grant:
        """What the token opens if it is valid now for `vm_id`; otherwise raises TokenError."""
        if self._cache is not None:
            try:
                cached_vm, grant = self._cache[token]
            except KeyError:
                pass
            else:
                if cached_vm != vm_id:
                    raise TokenError("wrong_vm", "the token was issued for another VM")
                if self._clock() >= grant.exp:
                    raise TokenError("expired", "the token has expired")
                return grant
        grant = self._verify_fully(token, vm_id)
        if self._cache is not None:
            self._cache[token] = (vm_id, grant)  # not stored if already past exp (leeway)
        return grant

    def _verify_fully(self, token: str, vm_id: str) -> Grant:
        if not token:
            raise TokenError("missing", "no token was given")
        if len(token) > _MAX_TOKEN:
            raise TokenError("malformed", "the token is too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as e:  # DecodeError, and a header pyjwt rejects (e.g. a non-string kid)
            raise TokenError("malformed", f"the token is not a valid JWT: {e}") from None
        kid = header.get("kid")
        key = self._ring.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise TokenError("unknown_kid", f"the token's key id {kid!r} is not known")
        if header.get("alg") != key.alg:
            raise TokenError("alg_not_allowed", f"key {kid!r} only accepts {key.alg}, not {header.get('alg')!r}")
        try:
            claims = jwt.decode(
                token,
                key.verifier,
                algorithms=[key.alg],
                audience=f"vm:{vm_id}",
                issuer=self._issuer,
                # Times are checked below with our own clock, the one the cache uses.
                options={
                    "require": ["exp", "iat", "sub", "aud", "iss"],
                    "verify_exp": False,
                    "verify_iat": False,
                    "strict_aud": True,
                },
            )
        except jwt.InvalidSignatureError:
            raise TokenError("bad_signature", "the token's signature does not verify") from None
        except jwt.InvalidAudienceError:
            raise TokenError("wrong_vm", "the token was issued for another VM") from None
        except jwt.InvalidIssuerError:
            raise TokenError("wrong_issuer", "the token was issued by someone else") from None
        except jwt.MissingRequiredClaimError as e:
            raise TokenError("malformed", f"the token lacks the {e.claim!r} claim") from None
        except jwt.InvalidTokenError as e:
            raise TokenError("malformed", f"the token is invalid: {e}") from None
        if claims["sub"] != vm_id:
            raise TokenError("wrong_vm", "the token was issued for another VM")
        exp, iat = claims["exp"], claims["iat"]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (exp, iat)):
            raise TokenError("malformed", "the token's exp and iat must be numbers")
        now = self._clock()
        if now >= exp + self._leeway:
            raise TokenError("expired", "the token has expired")
        if iat > now + self._leeway:
            raise TokenError("malformed", "the token was issued in the future")
        try:
            return Grant(float(exp), parse_scopes(claims.get("scp")), parse_ports(claims.get("ports")))
        except InvalidRequest as e:
            raise TokenError("malformed", f"the token's grant is invalid: {e}") from None


def _load(key: SigningKey) -> _LoadedKey:
    """Parse key material once; errors say which kid and what is wrong."""
    where = f"kid {key.kid!r}"
    if key.alg not in ALGORITHMS:
        raise ValueError(f"{where}: alg must be one of {', '.join(ALGORITHMS)}, got {key.alg!r}")
    if key.alg == "HS256":
        if key.secret is None or len(key.secret) < MIN_SECRET_BYTES:
            raise ValueError(f"{where}: an HS256 secret must be at least {MIN_SECRET_BYTES} bytes")
        return _LoadedKey(key.alg, key.secret, key.secret)
    if key.secret is not None:
        raise ValueError(f"{where}: {key.alg} keys take PEM key files, not a secret")
    private_type, public_type, curve_ok = _ASYMMETRIC[key.alg]
    private = public = None
    if key.private_key is not None:
        try:
            private = serialization.load_pem_private_key(key.private_key, password=None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: the private key is not an unencrypted PEM key: {e}") from None
        if not isinstance(private, private_type) or not curve_ok(private):
            raise ValueError(f"{where}: the private key is not a {key.alg} key")
        public = private.public_key()
    if key.public_key is not None:
        try:
            given = serialization.load_pem_public_key(key.public_key)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: the public key is not a PEM key: {e}") from None
        if not isinstance(given, public_type) or not curve_ok(given):
            raise ValueError(f"{where}: the public key is not a {key.alg} key")
        if public is not None and _spki(public) != _spki(given):
            raise ValueError(f"{where}: the public key does not belong to the private key")
        public = given
    if public is None:
        raise ValueError(f"{where}: {key.alg} needs a private key, a public key or both")
    return _LoadedKey(key.alg, private, public)


def _spki(public: Any) -> bytes:
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _p256(key: Any) -> bool:
    return isinstance(key.curve, ec.SECP256R1)


_ASYMMETRIC: dict[str, tuple[type, type, Callable[[Any], bool]]] = {
    "EdDSA": (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey, lambda _key: True),
    "ES256": (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey, _p256),
}


def extract_token(authorization: bytes | None, query: bytes | None, cookie: bytes | None) -> tuple[str | None, str]:
    """(token, source): `Authorization: Bearer`, then `token=` in the query (the part after
    `?`), then the mvm_token cookie; (None, "none") when none carries one.
    """
    if authorization:
        scheme, _, value = authorization.strip().partition(b" ")
        value = value.strip()
        if scheme.lower() == b"bearer" and value:
            return value.decode("latin-1"), "header"
    if query and b"token" in query:
        for part in query.split(b"&"):
            if part.startswith(b"token=") and len(part) > 6:
                return unquote(part[6:].decode("latin-1")), "query"
    if cookie and _COOKIE_PREFIX in cookie:
        for part in cookie.split(b";"):
            part = part.strip()
            if part.startswith(_COOKIE_PREFIX) and len(part) > len(_COOKIE_PREFIX):
                return part[len(_COOKIE_PREFIX) :].decode("latin-1"), "cookie"
    return None, "none"


def strip_token_from_target(target: bytes) -> bytes:
    """The request target without `token` query parameters, so the VM never sees the token."""
    path, sep, query = target.partition(b"?")
    if not sep or b"token" not in query:
        return target
    parts = query.split(b"&")
    kept = [p for p in parts if p != b"token" and not p.startswith(b"token=")]
    if len(kept) == len(parts):
        return target
    rest = b"&".join(kept)
    return path + b"?" + rest if rest else path


def strip_token_cookie(cookie_header: bytes) -> bytes | None:
    """The Cookie header without mvm_token (the VM never sees it); None when nothing remains."""
    if _COOKIE_PREFIX not in cookie_header:
        return cookie_header
    kept = [p for p in (c.strip() for c in cookie_header.split(b";")) if p and not p.startswith(_COOKIE_PREFIX)]
    return b"; ".join(kept) or None


def set_cookie_header(token: str, exp: float, now: float) -> bytes:
    """A host-only, HttpOnly, Secure cookie that lives exactly as long as the token."""
    max_age = max(0, int(exp - now))
    return f"{COOKIE_NAME}={token}; Max-Age={max_age}; Path=/; HttpOnly; Secure; SameSite=Lax".encode("latin-1")
