import base64
import hashlib
import hmac
import json
from collections.abc import Mapping

import jwt
import pytest
from cachetools import TLRUCache
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from edge.tokens import (
    SigningKey,
    TokenError,
    TokenService,
    extract_token,
    set_cookie_header,
    strip_token_cookie,
    strip_token_from_target,
)
from vmm.errors import InvalidRequest

SECRET = b"s" * 32
VM_A, VM_B = "vmaaaaaa", "vmbbbbbb"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def hs(kid: str = "k1", secret: bytes = SECRET) -> SigningKey:
    return SigningKey(kid=kid, alg="HS256", secret=secret)


def pem_pair(private: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    priv = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return priv, pub


def service(*keys: SigningKey, active: str = "k1", clock: Clock | None = None, **kw: object) -> TokenService:
    return TokenService(keys or [hs()], active, clock=clock or Clock(), **kw)  # type: ignore[arg-type]


def b64(data: Mapping[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def reason(svc: TokenService, token: str, vm_id: str = VM_A) -> str:
    with pytest.raises(TokenError) as info:
        svc.verify(token, vm_id)
    assert str(info.value)  # a sentence for humans
    return info.value.reason


def test_issue_and_verify_claims() -> None:
    clock = Clock()
    svc = service(clock=clock)
    token, exp = svc.issue(VM_A)
    assert exp == clock.now + 300
    assert svc.verify(token, VM_A) == exp
    header = jwt.get_unverified_header(token)
    assert header["kid"] == "k1" and header["alg"] == "HS256"
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == VM_A and claims["aud"] == f"vm:{VM_A}" and claims["iss"] == "microvm-edge"
    assert claims["iat"] == int(clock.now) and claims["exp"] == exp and claims["jti"]
    assert svc.issue(VM_A)[0] != token  # jti makes every token unique


def test_scoped_to_one_vm() -> None:
    svc = service()
    token, _ = svc.issue(VM_A)
    assert reason(svc, token, VM_B) == "wrong_vm"
    svc.verify(token, VM_A)  # now cached
    assert reason(svc, token, VM_B) == "wrong_vm"  # the cached path checks the VM too


def test_sub_and_aud_must_both_match() -> None:
    svc = service()
    claims = {"sub": VM_B, "aud": f"vm:{VM_A}", "iss": "microvm-edge", "iat": 1_800_000_000, "exp": 1_800_000_300}
    token = jwt.encode(claims, SECRET, algorithm="HS256", headers={"kid": "k1"})
    assert reason(svc, token, VM_A) == "wrong_vm"
    claims = {**claims, "sub": VM_A, "aud": [f"vm:{VM_A}", f"vm:{VM_B}"]}
    token = jwt.encode(claims, SECRET, algorithm="HS256", headers={"kid": "k1"})
    assert reason(svc, token, VM_A) == "wrong_vm"


def test_expiry_and_cache_never_outlive_exp() -> None:
    clock = Clock()
    svc = service(clock=clock)
    token, exp = svc.issue(VM_A, ttl=10)
    svc.verify(token, VM_A)
    assert token in svc._cache  # type: ignore[operator]
    clock.now = exp - 0.001
    assert svc.verify(token, VM_A) == exp
    clock.now = exp
    assert reason(svc, token) == "expired"
    assert token not in svc._cache  # type: ignore[operator]


def test_cached_entry_checks_exp_itself() -> None:
    clock = Clock()
    svc = service(clock=clock)
    # Even a cache that kept the entry too long does not extend the token.
    svc._cache = TLRUCache(10, ttu=lambda _k, entry, _now: entry[1].exp + 100, timer=clock)
    token, exp = svc.issue(VM_A, ttl=10)
    svc.verify(token, VM_A)
    clock.now = exp + 1
    assert token in svc._cache
    assert reason(svc, token) == "expired"


def test_cached_path_skips_signature_work(monkeypatch: pytest.MonkeyPatch) -> None:
    svc = service()
    token, _ = svc.issue(VM_A)
    svc.verify(token, VM_A)

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(jwt, "decode", boom)
    svc.verify(token, VM_A)


def test_cache_disabled() -> None:
    svc = service(cache_size=0)
    token, exp = svc.issue(VM_A)
    assert svc.verify(token, VM_A) == exp
    assert svc.verify(token, VM_A) == exp


def test_leeway_accepts_recently_expired() -> None:
    clock = Clock()
    svc = service(clock=clock, leeway=5)
    token, exp = svc.issue(VM_A, ttl=10)
    clock.now = exp + 4
    assert svc.verify(token, VM_A) == exp
    clock.now = exp + 5
    assert reason(svc, token) == "expired"


def test_iat_in_the_future_is_refused() -> None:
    clock = Clock()
    token, _ = service(clock=Clock(clock.now + 60)).issue(VM_A)
    assert reason(service(clock=clock), token) == "malformed"


def test_bad_signature() -> None:
    other = service(hs(secret=b"x" * 32))
    token, _ = other.issue(VM_A)
    assert reason(service(), token) == "bad_signature"
    # A's signature on B's claims
    svc = service()
    a, _ = svc.issue(VM_A)
    b, _ = svc.issue(VM_B)
    forged = ".".join([*b.split(".")[:2], a.split(".")[2]])
    assert reason(svc, forged, VM_B) == "bad_signature"


def test_alg_none_is_refused() -> None:
    svc = service()
    now = 1_800_000_000
    claims = {"sub": VM_A, "aud": f"vm:{VM_A}", "iss": "microvm-edge", "iat": now, "exp": now + 300}
    for header in ({"alg": "none", "kid": "k1", "typ": "JWT"}, {"alg": "none", "typ": "JWT"}):
        token = f"{b64(header)}.{b64(claims)}."
        assert reason(svc, token) in {"alg_not_allowed", "unknown_kid"}
    assert reason(svc, f"{b64({'alg': 'none', 'kid': 'k1'})}.{b64(claims)}.") == "alg_not_allowed"


def test_header_alg_never_chooses_the_algorithm() -> None:
    priv, pub = pem_pair(ed25519.Ed25519PrivateKey.generate())
    svc = service(SigningKey(kid="ed", alg="EdDSA", private_key=priv), active="ed")
    now = 1_800_000_000
    claims = {"sub": VM_A, "aud": f"vm:{VM_A}", "iss": "microvm-edge", "iat": now, "exp": now + 300}
    # The classic confusion: HMAC "signed" with the public key as the secret.
    body = f"{b64({'alg': 'HS256', 'kid': 'ed'})}.{b64(claims)}"
    sig = base64.urlsafe_b64encode(hmac.new(pub, body.encode(), hashlib.sha256).digest()).rstrip(b"=")
    assert reason(svc, f"{body}.{sig.decode()}") == "alg_not_allowed"


def test_unknown_kid() -> None:
    token, _ = service(hs("other"), active="other").issue(VM_A)
    assert reason(service(), token) == "unknown_kid"
    no_kid = jwt.encode({"sub": VM_A}, SECRET, algorithm="HS256")
    assert reason(service(), no_kid) == "unknown_kid"


def test_wrong_issuer_and_missing_claims() -> None:
    token, _ = service(issuer="someone-else").issue(VM_A)
    assert reason(service(), token) == "wrong_issuer"
    now = 1_800_000_000
    full = {"sub": VM_A, "aud": f"vm:{VM_A}", "iss": "microvm-edge", "iat": now, "exp": now + 300}
    for claim in full:
        partial = {k: v for k, v in full.items() if k != claim}
        token = jwt.encode(partial, SECRET, algorithm="HS256", headers={"kid": "k1"})
        assert reason(service(), token) == "malformed", claim


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "x" * 5000])
def test_malformed(token: str) -> None:
    assert reason(service(), token) in {"missing", "malformed"}


@pytest.mark.parametrize("kid", [5, None, ["k1"], {"k": 1}, True])
def test_a_header_with_a_non_string_kid_is_malformed(kid: object) -> None:
    """Anyone can craft one: it must be refused like any bad token, not raise past the verifier."""
    header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": kid}).encode()).rstrip(b"=").decode()
    assert reason(service(), f"{header}.eyJzdWIiOiJ4In0.c2lnbmF0dXJl") in {"malformed", "unknown_kid"}


def test_missing() -> None:
    assert reason(service(), "") == "missing"


def test_rotation_old_kid_still_verifies() -> None:
    clock = Clock()
    old = service(hs("old"), active="old", clock=clock)
    old_token, _ = old.issue(VM_A)
    rotated = service(hs("new", b"n" * 32), hs("old"), active="new", clock=clock)
    assert rotated.verify(old_token, VM_A)
    new_token, _ = rotated.issue(VM_A)
    assert jwt.get_unverified_header(new_token)["kid"] == "new"
    assert reason(old, new_token) == "unknown_kid"
    retired = service(hs("new", b"n" * 32), active="new", clock=clock)
    assert reason(retired, old_token) == "unknown_kid"


def test_eddsa_and_es256() -> None:
    ed_priv, ed_pub = pem_pair(ed25519.Ed25519PrivateKey.generate())
    es_priv, es_pub = pem_pair(ec.generate_private_key(ec.SECP256R1()))
    keys = [
        SigningKey(kid="ed", alg="EdDSA", private_key=ed_priv),
        SigningKey(kid="es", alg="ES256", private_key=es_priv, public_key=es_pub),
    ]
    verifier = service(
        SigningKey(kid="ed", alg="EdDSA", public_key=ed_pub),
        SigningKey(kid="es", alg="ES256", public_key=es_pub),
        hs(),
    )
    for kid, alg in (("ed", "EdDSA"), ("es", "ES256")):
        token, exp = service(*keys, active=kid).issue(VM_A)
        assert jwt.get_unverified_header(token)["alg"] == alg
        assert verifier.verify(token, VM_A) == exp
        assert reason(verifier, token, VM_B) == "wrong_vm"


def test_bad_key_material() -> None:
    ed_priv, ed_pub = pem_pair(ed25519.Ed25519PrivateKey.generate())
    _, other_pub = pem_pair(ed25519.Ed25519PrivateKey.generate())
    p384_priv, _ = pem_pair(ec.generate_private_key(ec.SECP384R1()))
    bad = [
        (hs(secret=b"short"), "at least 32 bytes"),
        (SigningKey(kid="k1", alg="HS512", secret=SECRET), "alg must be one of"),
        (SigningKey(kid="k1", alg="ES256", private_key=p384_priv), "not a ES256 key"),
        (SigningKey(kid="k1", alg="ES256", private_key=ed_priv), "not a ES256 key"),
        (SigningKey(kid="k1", alg="EdDSA", private_key=b"junk"), "not an unencrypted PEM key"),
        (SigningKey(kid="k1", alg="EdDSA", private_key=ed_priv, public_key=other_pub), "does not belong"),
        (SigningKey(kid="k1", alg="EdDSA"), "needs a private key"),
        (SigningKey(kid="k1", alg="EdDSA", secret=SECRET), "not a secret"),
    ]
    for key, message in bad:
        with pytest.raises(ValueError, match=message):
            service(key)
    with pytest.raises(ValueError, match="no private key"):
        service(SigningKey(kid="k1", alg="EdDSA", public_key=ed_pub))
    with pytest.raises(ValueError, match="not in the key ring"):
        service(hs(), active="nope")
    with pytest.raises(ValueError, match="listed twice"):
        service(hs(), hs())


def test_secrets_stay_out_of_repr() -> None:
    assert "s" * 32 not in repr(hs())


@pytest.mark.parametrize("ttl", [0, -1, 3601, True, "10"])
def test_ttl_limits(ttl: object) -> None:
    with pytest.raises(InvalidRequest, match="ttl"):
        service().issue(VM_A, ttl=ttl)  # type: ignore[arg-type]


def test_ttl_within_limits() -> None:
    clock = Clock(1_800_000_000.5)
    svc = service(clock=clock)
    assert svc.issue(VM_A, ttl=3600)[1] == 1_800_003_601  # whole seconds, never shorter
    assert svc.issue(VM_A, ttl=0.1)[1] > clock.now


def test_extract_token_precedence() -> None:
    assert extract_token(b"Bearer h", b"token=q", b"mvm_token=c") == ("h", "header")
    assert extract_token(b"bearer  h ", None, None) == ("h", "header")
    assert extract_token(b"Basic abc", b"a=1&token=q&b=2", b"mvm_token=c") == ("q", "query")
    assert extract_token(None, b"atoken=x&token=", b"x=1; mvm_token=c; y=2") == ("c", "cookie")
    assert extract_token(b"Bearer ", b"", b"") == (None, "none")
    assert extract_token(None, None, b"xmvm_token=c; mvm_token=") == (None, "none")
    assert extract_token(None, None, None) == (None, "none")
    assert extract_token(None, b"token=a%2Eb", None) == ("a.b", "query")


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/p?token=x", b"/p"),
        (b"/p?a=1&token=x&b=2", b"/p?a=1&b=2"),
        (b"/p?token=x&b=%20&a=1", b"/p?b=%20&a=1"),
        (b"/p?a=1&token&token=y", b"/p?a=1"),
        (b"/p?a=1&&b", b"/p?a=1&&b"),
        (b"/p?atoken=1&tokens=2", b"/p?atoken=1&tokens=2"),
        (b"/p", b"/p"),
        (b"/p?", b"/p?"),
        (b"/?token=x", b"/"),
    ],
)
def test_strip_token_from_target(target: bytes, expected: bytes) -> None:
    assert strip_token_from_target(target) == expected


def test_strip_token_cookie() -> None:
    assert strip_token_cookie(b"mvm_token=x") is None
    assert strip_token_cookie(b"a=1; mvm_token=x; b=2") == b"a=1; b=2"
    assert strip_token_cookie(b"a=1;mvm_token=x") == b"a=1"
    assert strip_token_cookie(b"a=1; b=2") == b"a=1; b=2"
    assert strip_token_cookie(b"xmvm_token=1") == b"xmvm_token=1"


def test_set_cookie_header() -> None:
    value = set_cookie_header("abc.def.ghi", exp=1300.0, now=1000.4)
    assert value == b"mvm_token=abc.def.ghi; Max-Age=299; Path=/; HttpOnly; Secure; SameSite=Lax"
    assert b"Domain" not in value
    assert b"Max-Age=0;" in set_cookie_header("t", exp=10.0, now=20.0)


def test_scopes_and_ports_travel_in_the_token() -> None:
    svc = service()
    token, exp = svc.issue(VM_A, scopes=["exec", "files"], ports="8000-8100")
    grant = svc.grant(token, VM_A)
    assert grant.exp == exp and grant.scopes == {"exec", "files"} and grant.ports == (8000, 8100)
    assert grant.allows_port(8080) and not grant.allows_port(9000)
    plain = svc.grant(svc.issue(VM_A)[0], VM_A)
    assert plain.scopes == {"http"} and plain.ports is None and plain.allows_port(1)
    assert svc.grant(svc.issue(VM_A, ports=8081)[0], VM_A).ports == (8081, 8081)


@pytest.mark.parametrize(
    ("scopes", "ports", "message"),
    [(["root"], None, "unknown scope 'root'"), ([], None, "non-empty list"), ("http", None, "non-empty list"),
     (None, "9000-8000", "low to high"), (None, "x", "ports must be"), (None, 70000, "within 1-65535")],
)  # fmt: skip
def test_bad_scopes_and_ports_are_refused(scopes: object, ports: object, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        service().issue(VM_A, scopes=scopes, ports=ports)
