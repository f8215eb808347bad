"""The web console at https://<control host>/console: sign-in, its session, and its static files.

Signing in trades the admin key for a random session id in an HttpOnly, Secure, SameSite=Strict,
host-only cookie, so the key is never in the page's URL or JavaScript. Sessions live on the server
and expire: in memory for one process, or as files in a directory that the edge workers share
(a session made by one worker is known to all of them, and signing out ends it on all of them).

The control API's one auth check (control.errors_and_auth) asks `session_refusal` when no admin
key is given. A request carried by the cookie alone must come from the console's own origin
(Origin, Sec-Fetch-Site), and one that changes something must also carry the session's CSRF
token in X-CSRF-Token: the page reads it from GET /console/session, which another site's page
cannot read. So a cross-site form or fetch with the cookie is refused.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
from aiohttp import web

from vmm.jsonlog import log

from .settings import ServerConfig

COOKIE = "__Host-mvm_console"  # __Host-: Secure, Path=/, no Domain, or the browser drops it
CSRF_HEADER = "X-CSRF-Token"
PREFIX = "/console"
ROOT = Path(__file__).resolve().parents[1] / "console"
_XTERM = ROOT / "node_modules" / "@xterm"
# URL name under /console/ -> file. Our own sources are served as written (plain ES modules, no
# build); xterm.js and its fit add-on are what `npm ci` (scripts/install.sh) put in node_modules.
FILES = {
    "index.html": ROOT / "src" / "index.html",
    "app.js": ROOT / "src" / "app.js",
    "api.js": ROOT / "src" / "api.js",
    "vm.js": ROOT / "src" / "vm.js",
    "console.css": ROOT / "src" / "console.css",
    "vendor/xterm.mjs": _XTERM / "xterm" / "lib" / "xterm.mjs",
    "vendor/addon-fit.mjs": _XTERM / "addon-fit" / "lib" / "addon-fit.mjs",
    "vendor/xterm.css": _XTERM / "xterm" / "css" / "xterm.css",
}
_TYPES = {".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css"}
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# The page may load only its own files and talk only to its own origin (no CDN, no inline script).
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)

_PAGE_HEADERS = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


@dataclass(frozen=True)
class Session:
    csrf: str
    expires: float


class Sessions:
    """Server-side sessions by id; stored as files under `directory` when workers share them, else in memory.

    Only the id's SHA-256 is kept, so reading the store does not give a usable cookie.
    """

    def __init__(self, ttl: float, directory: Path | None = None) -> None:
        self.ttl, self.directory = ttl, directory
        self._memory: dict[str, Session] = {}

    def create(self) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(32), expires=time.time() + self.ttl)
        self._drop_expired()
        key = _digest(sid)
        if self.directory is None:
            self._memory[key] = session
        else:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self.directory / f".{key}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(orjson.dumps({"csrf": session.csrf, "expires": session.expires}))
            os.replace(tmp, self.directory / key)
        return sid, session

    def get(self, sid: str) -> Session | None:
        key = _digest(sid)
        session = self._memory.get(key) if self.directory is None else self._read(self.directory / key)
        if session is None or session.expires <= time.time():
            return None
        return session

    def drop(self, sid: str) -> None:
        key = _digest(sid)
        self._memory.pop(key, None)
        if self.directory is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / key).unlink()

    def _read(self, path: Path) -> Session | None:
        try:
            data = orjson.loads(path.read_bytes())
            return Session(csrf=str(data["csrf"]), expires=float(data["expires"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _drop_expired(self) -> None:
        now = time.time()
        for key, session in list(self._memory.items()):
            if session.expires <= now:
                del self._memory[key]
        if self.directory is not None and self.directory.is_dir():
            for path in self.directory.iterdir():
                found = self._read(path)
                if found is not None and found.expires <= now:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()


def _digest(sid: str) -> str:
    return hashlib.sha256(sid.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    content_type: str
    etag: str


def load_assets(files: dict[str, Path] = FILES) -> dict[str, Asset]:
    """Every file read and gzipped once, at start; {} when xterm.js is not installed yet."""
    assets: dict[str, Asset] = {}
    for name, path in files.items():
        try:
            body = path.read_bytes()
        except FileNotFoundError:
            log.event("console.assets_missing", level="warning", path=str(path), hint="run scripts/install.sh")
            return {}
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        assets[name] = Asset(body, gzip.compress(body, 9, mtime=0), _TYPES[path.suffix], etag)
    return assets


SESSIONS = web.AppKey("console_sessions", Sessions)
ASSETS = web.AppKey("console_assets", dict[str, Asset])
CONSOLE_SERVER = web.AppKey("console_server", ServerConfig)


def is_console_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def _own_origin(request: web.Request) -> str:
    scheme = "https" if request.app[CONSOLE_SERVER].tls else "http"
    return f"{scheme}://{request.host}"


def _cross_site(request: web.Request) -> str | None:
    """Why the request does not come from the console's own origin, or None if it does (or says nothing)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site: {site}"
    origin = request.headers.get("Origin")
    if origin is not None and origin != _own_origin(request):
        return f"Origin: {origin}"
    return None


def session_refusal(request: web.Request) -> tuple[int, str] | None:
    """None if the console's session cookie authorises this request; else the status and message to answer."""
    sid = request.cookies.get(COOKIE)
    if sid is None or SESSIONS not in request.app:
        return 401, "missing or wrong admin key (Authorization: Bearer <server.admin_key>)"
    session = request.app[SESSIONS].get(sid)
    if session is None:
        return 401, "the console session has ended or expired: sign in again"
    why = _cross_site(request)
    if why is not None:
        return 403, f"a request with the console's cookie must come from the console ({why})"
    if request.method not in _SAFE_METHODS:
        given = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), session.csrf.encode()):
            return 403, f"missing or wrong {CSRF_HEADER} header (the console reads it from GET {PREFIX}/session)"
    return None


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})  # fmt: skip


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": code, "message": message}, status)


async def sign_in(request: web.Request) -> web.Response:
    """POST /console/session {"key": <admin key>}: a session cookie and the CSRF token, or 401."""
    why = _cross_site(request)
    if why is not None:
        return _error(403, "forbidden", f"sign in from the console's own page ({why})")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = None
    key = body.get("key") if isinstance(body, dict) else None
    if not isinstance(key, str):
        return _error(422, "invalid_request", 'the body must be {"key": "<server.admin_key>"}')
    expected = request.app[CONSOLE_SERVER].admin_key.encode()
    if not hmac.compare_digest(key.encode("utf-8", "surrogateescape"), expected):
        log.event("console.sign_in_refused", level="warning", remote=request.remote)
        return _error(401, "unauthorized", "wrong admin key")
    old = request.cookies.get(COOKIE)
    if old is not None:
        request.app[SESSIONS].drop(old)  # a sign-in never keeps a session id the browser had before
    sid, session = request.app[SESSIONS].create()
    log.event("console.signed_in", remote=request.remote, expires=round(session.expires))
    response = _json({"signed_in": True, "csrf": session.csrf, "expires_at": session.expires})
    response.set_cookie(COOKIE, sid, path="/", secure=True, httponly=True, samesite="Strict",
                        max_age=int(request.app[SESSIONS].ttl))  # fmt: skip
    return response


async def session_info(request: web.Request) -> web.Response:
    """GET /console/session: whether the cookie is a live session, and its CSRF token for the page."""
    refusal = session_refusal(request)
    if refusal is not None:
        return _json({"signed_in": False, "message": refusal[1]}, refusal[0] if refusal[0] == 403 else 200)
    session = request.app[SESSIONS].get(request.cookies[COOKIE])
    assert session is not None
    return _json({"signed_in": True, "csrf": session.csrf, "expires_at": session.expires})


async def sign_out(request: web.Request) -> web.Response:
    """DELETE /console/session: ends the session on the server (with the CSRF header) and clears the cookie."""
    refusal = session_refusal(request)
    if refusal is not None:
        return _error(refusal[0], "unauthorized" if refusal[0] == 401 else "forbidden", refusal[1])
    request.app[SESSIONS].drop(request.cookies[COOKIE])
    response = web.Response(status=204)
    response.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
    return response


async def asset(request: web.Request) -> web.StreamResponse:
    """The page (at /console) and its files; gzipped for clients that take it."""
    name = request.match_info.get("name") or "index.html"
    assets = request.app[ASSETS]
    if not assets:
        return _error(503, "unavailable", "the console's files are not installed: run scripts/install.sh")
    found = assets.get(name)
    if found is None:
        return _error(404, "not_found", f"{PREFIX}/{name}: no such console file")
    headers = {"ETag": found.etag, "Cache-Control": "no-cache", "Vary": "Accept-Encoding", **_PAGE_HEADERS}
    if request.headers.get("If-None-Match") == found.etag:
        return web.Response(status=304, headers=headers)
    body = found.body
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        body, headers["Content-Encoding"] = found.gzipped, "gzip"
    return web.Response(body=body, headers={**headers, "Content-Type": f"{found.content_type}; charset=utf-8"})


def add_routes(app: web.Application, server: ServerConfig, ttl: float, directory: Path | None = None) -> None:
    """The console on this control app: its sessions (shared through `directory` across workers) and files."""
    app[SESSIONS], app[ASSETS], app[CONSOLE_SERVER] = Sessions(ttl, directory), load_assets(), server
    app.router.add_get(PREFIX, asset)
    app.router.add_get(f"{PREFIX}/", asset)
    app.router.add_get(PREFIX + "/session", session_info)
    app.router.add_post(PREFIX + "/session", sign_in)
    app.router.add_delete(PREFIX + "/session", sign_out)
    app.router.add_get(PREFIX + "/{name:.+}", asset)
