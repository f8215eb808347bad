"""The web console's sign-in, session cookie and CSRF defence, on the control API's own auth check."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from edge import console, control
from edge.control import errors_and_auth
from edge.metrics import Metrics
from edge.settings import DEV_ADMIN_KEY, ServerConfig, token_service
from fleet.edge_control import build_edge_control_app
from fleet.run_dir import ENV as RUN_DIR_ENV
from fleet.run_dir import RunDir
from mvm.config import load_config
from tests.unit.test_usage import _HostApis, _TwoHosts

SERVER = ServerConfig(tls=False)


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@pytest.fixture
async def base() -> AsyncIterator[str]:
    """A control app with the console, one GET and one POST route under /v1."""
    app = web.Application(middlewares=[errors_and_auth])
    app[control.SERVER] = SERVER
    console.add_routes(app, SERVER, ttl=60.0)
    app.router.add_get("/v1/thing", _ok)
    app.router.add_post("/v1/thing", _ok)
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("")).rstrip("/")


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())  # cookies by hand: Secure over http


async def _sign_in(http: aiohttp.ClientSession, base: str) -> tuple[str, str]:
    async with http.post(f"{base}/console/session", json={"key": DEV_ADMIN_KEY}) as r:
        assert r.status == 200
        cookie = r.cookies[console.COOKIE]
        return f"{console.COOKIE}={cookie.value}", (await r.json())["csrf"]


async def test_sign_in_sets_a_strict_httponly_secure_cookie_that_is_not_the_key(base: str) -> None:
    async with _session() as http, http.post(f"{base}/console/session", json={"key": DEV_ADMIN_KEY}) as r:
        assert r.status == 200
        morsel = r.cookies[console.COOKIE]
        assert morsel["httponly"] and morsel["secure"] and morsel["samesite"] == "Strict" and morsel["path"] == "/"
        assert int(morsel["max-age"]) == 60 and not morsel["domain"]
        assert DEV_ADMIN_KEY not in morsel.value and DEV_ADMIN_KEY not in await r.text()


async def test_a_wrong_key_is_refused_without_a_cookie(base: str) -> None:
    async with _session() as http, http.post(f"{base}/console/session", json={"key": "wrong-key-0123456789"}) as r:
        assert r.status == 401 and console.COOKIE not in r.cookies
        assert (await r.json())["message"] == "wrong admin key"


async def test_the_cookie_authorises_reads_and_with_the_csrf_token_changes(base: str) -> None:
    async with _session() as http:
        cookie, csrf = await _sign_in(http, base)
        async with http.get(f"{base}/v1/thing", headers={"Cookie": cookie}) as r:
            assert r.status == 200
        async with http.get(f"{base}/console/session", headers={"Cookie": cookie}) as r:
            assert (await r.json())["csrf"] == csrf
        async with http.post(f"{base}/v1/thing", headers={"Cookie": cookie, "X-CSRF-Token": csrf}) as r:
            assert r.status == 200
        async with http.get(f"{base}/v1/thing") as r:
            assert r.status == 401


@pytest.mark.parametrize(
    "headers",
    [
        {},  # a cross-site form post: the cookie alone
        {"X-CSRF-Token": "guessed"},
        {"Origin": "https://evil.example", "X-CSRF-Token": "<csrf>"},
        {"Sec-Fetch-Site": "cross-site", "X-CSRF-Token": "<csrf>"},
        {"Sec-Fetch-Site": "same-site", "X-CSRF-Token": "<csrf>"},
    ],
)
async def test_a_cookie_alone_or_from_another_site_cannot_change_anything(base: str, headers: dict[str, str]) -> None:
    async with _session() as http:
        cookie, csrf = await _sign_in(http, base)
        sent = {k: v.replace("<csrf>", csrf) for k, v in headers.items()}
        async with http.post(f"{base}/v1/thing", headers={"Cookie": cookie, **sent}) as r:
            assert r.status == 403
            assert (await r.json())["error"] == "forbidden"


async def test_a_websocket_or_read_from_another_origin_is_refused(base: str) -> None:
    async with _session() as http:
        cookie, _ = await _sign_in(http, base)
        async with http.get(f"{base}/v1/thing", headers={"Cookie": cookie, "Origin": "https://evil.example"}) as r:
            assert r.status == 403
        async with http.get(f"{base}/v1/thing", headers={"Cookie": cookie, "Origin": base}) as r:
            assert r.status == 200


async def test_sign_out_ends_the_session_on_the_server(base: str) -> None:
    async with _session() as http:
        cookie, csrf = await _sign_in(http, base)
        async with http.delete(f"{base}/console/session", headers={"Cookie": cookie}) as r:
            assert r.status == 403  # sign-out needs the CSRF token too
        async with http.delete(f"{base}/console/session", headers={"Cookie": cookie, "X-CSRF-Token": csrf}) as r:
            assert r.status == 204
        async with http.get(f"{base}/v1/thing", headers={"Cookie": cookie}) as r:
            assert r.status == 401
            assert "sign in again" in (await r.json())["message"]


async def test_signing_in_again_ends_the_session_the_browser_had(base: str) -> None:
    async with _session() as http:
        cookie, _ = await _sign_in(http, base)
        headers = {"Cookie": cookie}
        async with http.post(f"{base}/console/session", json={"key": DEV_ADMIN_KEY}, headers=headers) as r:
            assert r.status == 200 and f"{console.COOKIE}={r.cookies[console.COOKIE].value}" != cookie
        async with http.get(f"{base}/v1/thing", headers=headers) as r:
            assert r.status == 401


async def test_the_page_and_its_files_are_served_gzipped_with_a_strict_policy(base: str) -> None:
    async with _session() as http:
        async with http.get(f"{base}/console", headers={"Accept-Encoding": "gzip"}, auto_decompress=False) as r:
            assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
            assert b"/console/app.js" in gzip.decompress(await r.read())
        async with http.get(f"{base}/console/vendor/xterm.mjs") as r:
            assert r.status == 200 and r.content_type == "text/javascript"
            etag = r.headers["ETag"]
        async with http.get(f"{base}/console/vendor/xterm.mjs", headers={"If-None-Match": etag}) as r:
            assert r.status == 304
        async with http.get(f"{base}/console/settings.py") as r:
            assert r.status == 404


def test_missing_files_leave_no_assets(tmp_path: Path) -> None:
    assert console.load_assets({"index.html": tmp_path / "absent.html"}) == {}


def test_sessions_in_a_shared_directory_are_known_to_every_worker_and_expire(tmp_path: Path) -> None:
    one, two = console.Sessions(60.0, tmp_path / "s"), console.Sessions(60.0, tmp_path / "s")
    sid, session = one.create()
    assert two.get(sid) == session and two.get(sid + "x") is None
    assert all(sid not in p.name and sid not in p.read_text() for p in (tmp_path / "s").iterdir())
    two.drop(sid)
    assert one.get(sid) is None
    expired = console.Sessions(0.0, tmp_path / "s")
    old, _ = expired.create()
    assert expired.get(old) is None
    one.create()  # drops expired sessions' files as it makes a new one
    assert len(list((tmp_path / "s").iterdir())) == 1


async def test_a_sign_in_on_one_fleet_edge_worker_holds_and_ends_on_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers of one set share the run directory's sessions: any of them honours a sign-in and a sign-out."""
    run = RunDir.create(workers=2, max_connections=10, base=tmp_path)
    monkeypatch.setenv(RUN_DIR_ENV, str(run.path))
    cfg = load_config(None)
    cfg = replace(cfg, server=replace(cfg.server, tls=False))
    apps = [build_edge_control_app(cfg, _TwoHosts(), _HostApis(), token_service(cfg.tokens), Metrics())  # type: ignore[arg-type]
            for _ in range(2)]  # fmt: skip
    try:
        async with TestServer(apps[0], host="127.0.0.1") as one, TestServer(apps[1], host="127.0.0.1") as two:
            base_one, base_two = (str(s.make_url("")).rstrip("/") for s in (one, two))
            async with _session() as http:
                cookie, csrf = await _sign_in(http, base_one)
                async with http.get(f"{base_two}/console/session", headers={"Cookie": cookie}) as r:
                    assert (await r.json())["signed_in"] is True
                headers = {"Cookie": cookie, "X-CSRF-Token": csrf}
                async with http.delete(f"{base_two}/console/session", headers=headers) as r:
                    assert r.status == 204
                async with http.get(f"{base_one}/v1/vms", headers={"Cookie": cookie}) as r:
                    assert r.status == 401
    finally:
        run.remove()
