"""Deciding on a request from its head alone: where it goes, whether its token opens that
VM, and the head the VM (or the control API) receives. No I/O happens here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from vmm.model import VmRecord, VmState

from .backend import VmBackend
from .hostnames import HostnameRouter, Route
from .port_select import choose_port
from .reqhead import RequestHead
from .tokens import (
    Grant,
    TokenError,
    TokenService,
    extract_token,
    set_cookie_header,
    strip_token_cookie,
    strip_token_from_target,
)

_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
_RUNNING = VmState.RUNNING
AGENT_PREFIX = b"/.mvm/"
_AGENT_METHODS = {b"exec": (b"POST",), b"files": (b"GET", b"PUT", b"DELETE"), b"shell": (b"GET",)}


@dataclass(frozen=True, slots=True)
class Refusal:
    """The edge answers itself, with this status and JSON error."""

    status: int
    message: str
    reason: str | None = None
    bearer: bool = False  # 401: add WWW-Authenticate: Bearer
    retry_after: int | None = None  # seconds, for a Retry-After header


@dataclass(slots=True)
class _Repeat:
    """A VM request admitted on this connection, kept to admit the same head again at once:
    everything its verdict came from is in `key` but the token's life and the VM's record,
    which are looked at again each time. `verdict` itself is handed out again while what it
    took from the record still holds (nobody changes an admission once made)."""

    key: tuple[object, ...]
    method: bytes
    grant: Grant
    verdict: Admission
    alias: object = None  # the same request in another form (an HTTP/2 header list): see `tie`


@dataclass(slots=True)
class Admission:
    """Forward `head`: to the VM's port, or to the control API when `vm_id` is None."""

    head: bytes
    vm_id: str | None = None
    port: int = 0
    running: bool = True
    set_cookie: bytes | None = None  # lines for the response head: a Set-Cookie, the port's subprotocol
    generation: int = 0  # the VM's, as this edge knows it: pooled connections of another are not used
    h2c: bool = False  # the port speaks prior-knowledge HTTP/2 only (an image label): HTTP/1.1 cannot be relayed


class Admitter:
    """Admits the requests of one client connection (which mostly repeats one Host)."""

    def __init__(
        self,
        backend: VmBackend,
        router: HostnameRouter,
        tokens: TokenService,
        client: bytes,
        proto: bytes,
        control_auth: bytes = b"",
        trusted: bool = False,
    ) -> None:
        self._backend = backend
        self._router = router
        self._tokens = tokens
        self._client = client
        self._proto = proto
        self._control_auth = control_auth  # what the control API accepts, for the agent paths below
        self._trusted = trusted  # the client is a trusted proxy: its X-Forwarded-For is kept
        self._host: bytes | None = None
        self._route: Route | None = None
        self._repeat: _Repeat | None = None

    def admit(
        self, method: bytes, target: bytes, http_version: str, req: RequestHead, upgrade: bool
    ) -> Admission | Refusal:
        """What to do with a request: forward it (and where, with which head) or refuse it.

        A keep-alive client mostly sends the same head again (the same target, Host and
        token): its verdict is reused once the token is still valid and the VM still exists."""
        repeat = self._repeat
        if repeat is not None and repeat.key == (method, target, http_version, upgrade, req.signature()):
            verdict = self.readmit()
            if verdict is not None:
                return verdict
        return self._admit(method, target, http_version, req, upgrade)

    def readmit(self) -> Admission | None:
        """The verdict kept for the last VM request admitted here, for its head sent again; None when
        none is kept or it no longer holds (the token expired, the VM is gone): the head is then
        admitted anew. What it took from the VM's record is brought up to date first."""
        repeat = self._repeat
        if repeat is None:
            return None
        verdict = repeat.verdict
        assert verdict.vm_id is not None
        rec = self._backend.lookup(verdict.vm_id)
        if rec is None or not self._tokens.still_valid(repeat.grant):
            return None
        if (
            verdict.running is not (rec.state is _RUNNING)
            or verdict.generation != rec.generation
            or verdict.h2c is not (verdict.port in rec.h2c_ports)
        ):
            head, vm_id, port, set_cookie = verdict.head, verdict.vm_id, verdict.port, verdict.set_cookie
            verdict = repeat.verdict = _admission(head, vm_id, port, rec, set_cookie)
        return verdict

    def keeps(self, head: bytes) -> bool:
        """Whether `head` (an admitted exchange's) is the kept verdict's: `readmit` answers for it."""
        return self._repeat is not None and self._repeat.verdict.head is head

    def tie(self, alias: object, head: bytes) -> None:
        """`alias` is the request whose admission made `head`, as it came (an HTTP/2 header list): when
        `head` is the kept verdict's, the same alias again is that request again (`kept_method`). The
        alias lives and dies with the kept verdict: another one kept forgets it."""
        repeat = self._repeat
        if repeat is not None and repeat.verdict.head is head:
            repeat.alias = alias

    def kept_method(self, alias: object) -> bytes | None:
        """The kept request's method when `alias` equals the one tied to it (`readmit` then answers
        for it); None otherwise."""
        repeat = self._repeat
        if repeat is None or repeat.alias != alias:
            return None
        return repeat.method

    def _admit(
        self, method: bytes, target: bytes, http_version: str, req: RequestHead, upgrade: bool
    ) -> Admission | Refusal:
        version = _VERSIONS.get(http_version)
        if version is None:
            return Refusal(505, "only HTTP/1.0 and HTTP/1.1 are served")
        if method == b"CONNECT":
            return Refusal(405, "CONNECT is not supported")
        host = req.host
        if host is None or req.hosts != 1:
            return Refusal(400, "a request needs exactly one Host header")
        route = self._route_for(host)
        if route is None:
            return Refusal(404, f"nothing is served at {host.decode('latin-1')}")
        if not target.startswith(b"/") and target != b"*":
            origin = _origin_form(target, host)
            if origin is None:
                return Refusal(400, "an absolute-form target must name the Host it is sent to")
            target = origin
        if route.control:  # the control API checks its own credentials: pass them on
            head = req.render(
                method,
                target,
                version,
                keep_authorization=True,
                cookie=req.cookie,
                upgrade=upgrade,
                client=self._client,
                proto=self._proto,
                trust_forwarded=self._trusted,
            )
            return Admission(head)
        vm_id = route.vm_id
        assert vm_id is not None
        # The token is checked first: without one for this VM id, nobody learns whether the VM
        # exists or which of its ports are open.
        query = target.partition(b"?")[2] if b"token" in target else None
        token, source = extract_token(req.authorization, query, req.cookie)
        try:
            grant = self._tokens.grant(token or "", vm_id)
        except TokenError as exc:
            return Refusal(401, str(exc), exc.reason, bearer=True)
        rec = self._backend.lookup(vm_id)
        if rec is None:
            return Refusal(404, f"VM {vm_id} does not exist")
        set_cookie = None
        if source == "query" and token is not None:
            set_cookie = b"Set-Cookie: " + set_cookie_header(token, grant.exp, time.time()) + b"\r\n"
        choice = choose_port(route.port, req.mvm_port, req.ws_protocol)
        if isinstance(choice, str):
            return Refusal(400, choice)
        if target.startswith(AGENT_PREFIX) and choice.port is None:
            verdict = self._agent_api(method, target, version, req, vm_id, grant, upgrade)
            if isinstance(verdict, Admission):
                verdict.set_cookie = set_cookie  # a browser page (the shell) then loads the rest by cookie
            return verdict
        if "http" not in grant.scopes:
            return _missing_scope(grant, "http")
        port = rec.app_port
        if choice.port is not None:
            port = choice.port
            if not rec.allows_port(port):
                return Refusal(403, f"port {port} of VM {vm_id} is not open")
        if not grant.allows_port(port):
            return Refusal(403, f"this token does not open port {port}")
        if upgrade and choice.echo is not None:  # the port entry was the only subprotocol: the 101 names it
            set_cookie = (set_cookie or b"") + b"Sec-WebSocket-Protocol: " + choice.echo + b"\r\n"
        key = (method, target, http_version, upgrade, req.signature())
        if query is not None:
            target = strip_token_from_target(target)
        cookie = req.cookie
        if cookie is not None:
            cookie = strip_token_cookie(cookie)
        head = req.render(
            method,
            target,
            version,
            keep_authorization=source != "header",
            cookie=cookie,
            upgrade=upgrade,
            client=self._client,
            proto=self._proto,
            trust_forwarded=self._trusted,
            subprotocols=choice.subprotocols,
        )
        verdict = _admission(head, vm_id, port, rec, set_cookie)
        if source == "header" and route.port is None:  # the same head again is admitted the same way
            self._repeat = _Repeat(key, method, grant, verdict)
        return verdict

    def _agent_api(
        self, method: bytes, target: bytes, version: bytes, req: RequestHead, vm_id: str, grant: Grant, upgrade: bool
    ) -> Admission | Refusal:
        """`/.mvm/exec`, `/.mvm/files` and `/.mvm/shell` on the VM's own host name: the control API's agent
        endpoints for this VM only, with a token that carries the scope. The app never sees these paths."""
        path, _, query = target.partition(b"?")
        rest = path[len(AGENT_PREFIX) :]
        name = rest
        methods = _AGENT_METHODS.get(name)
        if methods is None:
            listed = ", ".join(f"/.mvm/{n.decode()}" for n in _AGENT_METHODS)
            return Refusal(404, f"{path.decode('latin-1')} is not an agent endpoint ({listed})")
        if name.decode() not in grant.scopes:
            return _missing_scope(grant, name.decode())
        if method not in methods:
            return Refusal(405, f"{path.decode()} takes {' or '.join(m.decode() for m in methods)}")
        rewritten = b"/v1/vms/" + vm_id.encode() + b"/" + rest
        if query:
            rewritten = strip_token_from_target(rewritten + b"?" + query)
        head = req.render(
            method, rewritten, version, keep_authorization=False, cookie=None, upgrade=upgrade and name == b"shell",
            client=self._client, proto=self._proto, trust_forwarded=self._trusted,
        )  # fmt: skip
        # The scoped token stays here; the control API behind it takes the edge's own credential.
        return Admission(head.replace(b"\r\n", b"\r\nAuthorization: " + self._control_auth + b"\r\n", 1))

    def _route_for(self, host: bytes) -> Route | None:
        if host != self._host:
            self._route = self._router.route(host.decode("latin-1"))
            self._host = host
        return self._route


def _admission(head: bytes, vm_id: str, port: int, rec: VmRecord, set_cookie: bytes | None) -> Admission:
    return Admission(head, vm_id, port, rec.state is _RUNNING, set_cookie, rec.generation, port in rec.h2c_ports)


def _missing_scope(grant: Grant, scope: str) -> Refusal:
    return Refusal(403, f"this token's scopes ({', '.join(sorted(grant.scopes))}) do not include {scope}")


def _origin_form(target: bytes, host: bytes) -> bytes | None:
    """`http://host/path?q` -> `/path?q` when it names `host` (routing went by Host); else None."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return None
    authority, slash, path = rest.partition(b"/")
    authority = authority.rpartition(b"@")[2]  # no userinfo is honoured
    if authority.split(b":")[0].lower() != host.split(b":")[0].lower():
        return None
    return b"/" + path if slash else b"/"
