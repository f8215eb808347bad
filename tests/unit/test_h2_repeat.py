"""An HTTP/2 connection's repeats: a stream whose header list is the last admitted one again takes the
kept verdict (token life and the VM's record looked at again, anything else admitted anew), and a
guest's answer that is its connection's last whole small answer again is sent unparsed, with the
outcome a parse would have (the edge's Set-Cookie per exchange, HEAD parsed as ever)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest
from h2.errors import ErrorCodes

from edge.admission import Admission, Admitter, Refusal
from edge.h2_stream import H2Stream
from edge.hostnames import HostnameRouter
from edge.metrics import Metrics
from edge.proxy_context import ProxyContext, ProxySettings
from edge.reqhead import RequestHead
from edge.tokens import SigningKey, TokenService
from edge.upstream import UpstreamConn, UpstreamPool
from tests.unit.proxy_harness import CONTROL, DOMAIN, OTHER_VM, SECRET, VM, FakeBackend

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
OTHER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nworld"
EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class Transport:
    """A guest connection's transport that keeps what the edge wrote."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, parts: Iterable[bytes]) -> None:
        self.written.append(b"".join(parts))

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True


class Core:
    """What a stream needs of its connection, recording what it sends to the client."""

    def __init__(self, ctx: ProxyContext, clock: list[float]) -> None:
        self.ctx = ctx
        self.settings = ctx.settings.http2
        self.clock = lambda: clock[0]
        self.admitter = Admitter(ctx.backend, ctx.router, ctx.tokens, b"203.0.113.9", b"https")
        self.io = self
        self.sent: list[tuple[Any, ...]] = []
        self.reached: list[H2Stream] = []

    def reach(self, stream: H2Stream) -> None:
        self.reached.append(stream)

    def cancel_reach(self, stream: H2Stream) -> None:
        pass

    def send_head(self, sid: int, status: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        self.sent.append(("head", sid, status, list(headers), end))

    def send_body(self, sid: int, data: bytes, end: bool = False) -> bool:
        self.sent.append(("body", sid, data, end))
        return False

    def send_end(self, sid: int, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.sent.append(("end", sid))

    def ack_body(self, sid: int, n: int) -> None:
        pass

    def reset(self, sid: int, code: ErrorCodes, reason: str) -> None:
        self.sent.append(("reset", sid, reason))

    def arm(self, when: float) -> None:
        pass


class Conn:
    """One HTTP/2 client connection's streams against a fake backend, each served on a pooled guest
    connection (made when none is idle) that answers with what the test gives."""

    def __init__(self) -> None:
        self.now = [1000.0]
        self.backend = FakeBackend()
        self.backend.add_vm(VM, 0, ports=(3000,))
        self.backend.add_vm(OTHER_VM, 0)
        self.tokens = TokenService([SigningKey("k1", "HS256", secret=SECRET)], "k1", clock=lambda: self.now[0])
        self.pool = UpstreamPool(8, 60.0)
        ctx = ProxyContext(
            backend=self.backend,  # type: ignore[arg-type]
            router=HostnameRouter(DOMAIN, CONTROL),
            tokens=self.tokens,
            metrics=Metrics(),
            pool=self.pool,
            control_socket="",
            settings=ProxySettings(),
        )
        self.core = Core(ctx, self.now)
        self.sid = -1
        self.admissions = 0
        admit = self.core.admitter.admit

        def counted(method: bytes, target: bytes, version: str, req: RequestHead, upgrade: bool) -> Admission | Refusal:
            self.admissions += 1
            return admit(method, target, version, req, upgrade)

        self.core.admitter.admit = counted  # type: ignore[method-assign]

    def token(self, vm: str = VM, ttl: float = 3600) -> str:
        return self.tokens.issue(vm, ttl=ttl)[0]

    def fields(self, token: str | None, path: str = "/poll", vm: str = VM, method: str = "GET", **extra: str) -> list:
        """A request's header list; the token in Authorization unless None."""
        out = [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", f"{vm}.{DOMAIN}".encode())]
        out.append((b":path", path.encode()))
        if token is not None:
            out.append((b"authorization", f"Bearer {token}".encode()))
        return out + [(k.replace("_", "-").encode(), v.encode()) for k, v in extra.items()]

    def request(self, fields: list, answer: bytes | None = OK) -> tuple[H2Stream, bytes | None, list[tuple]]:
        """A bodiless stream: what the guest got (None: it was refused) and what the client got."""
        self.sid += 2
        self.core.sent = []
        stream = H2Stream(self.core, self.sid, list(fields), True)  # type: ignore[arg-type]
        stream.start()
        if self.core.reached:
            reached = self.core.reached.pop()
            assert reached is stream
            ex = stream.ex
            conn = UpstreamConn(self.pool, (ex.vm_id or "", ex.port), ex.generation)
            conn.connection_made(Transport())  # type: ignore[arg-type]
            stream.upstream_opened(ex, conn)
        conn = stream._upstream
        if conn is None:
            return stream, None, self.core.sent
        transport: Transport = conn.transport  # type: ignore[assignment]
        seen = transport.written.pop()
        if answer is not None:
            conn.data_received(answer)
        return stream, seen, self.core.sent


def _target(seen: bytes | None) -> bytes:
    assert seen is not None
    return seen.split(b" ")[1]


def _status(sent: list[tuple]) -> int:
    return next(s[2] for s in sent if s[0] == "head")


@pytest.fixture
async def conn() -> Conn:
    await asyncio.sleep(0)  # the pool schedules its sweeps on the running loop
    return Conn()


# -- the kept header list ----------------------------------------------------------------------


async def test_the_same_header_list_again_is_forwarded_unadmitted(conn: Conn) -> None:
    fields = conn.fields(conn.token())
    _, first, _ = conn.request(fields)
    for _ in range(3):
        stream, seen, sent = conn.request(fields)
        assert seen == first and _status(sent) == 200
        assert stream._head is None, "the request was not read again"
    assert conn.admissions == 1


@pytest.mark.parametrize(
    "change",
    ["path", "authority", "token", "port header", "cookie", "method"],
)
async def test_any_other_header_list_is_admitted_anew(conn: Conn, change: str) -> None:
    token = conn.token()
    conn.request(conn.fields(token))
    if change == "path":
        other = conn.fields(token, path="/other")
    elif change == "authority":
        other = conn.fields(conn.token(OTHER_VM), vm=OTHER_VM)
    elif change == "token":
        other = conn.fields("not-a-token")
    elif change == "port header":
        other = conn.fields(token, x_mvm_port="3000")
    elif change == "cookie":
        other = conn.fields(token, cookie="a=1")
    else:
        other = conn.fields(token, method="DELETE")
    stream, seen, sent = conn.request(other)
    assert conn.admissions == 2
    if change == "token":
        assert seen is None and _status(sent) == 401
        return
    assert seen is not None
    if change == "path":
        assert _target(seen) == b"/other"
    elif change == "authority":
        assert stream.ex.vm_id == OTHER_VM
    elif change == "port header":
        assert stream.ex.port == 3000 and b"x-mvm-port" not in seen.lower()
    elif change == "cookie":
        assert b"\r\nCookie: a=1\r\n" in seen
    else:
        assert seen.startswith(b"DELETE /poll ")


async def test_an_expired_token_is_refused_though_its_header_list_was_kept(conn: Conn) -> None:
    fields = conn.fields(conn.token(ttl=10))
    _, seen, _ = conn.request(fields)
    assert seen is not None
    conn.now[0] += 11
    _, seen, sent = conn.request(fields)
    assert seen is None and _status(sent) == 401


async def test_a_deleted_vm_is_refused_though_its_header_list_was_kept(conn: Conn) -> None:
    fields = conn.fields(conn.token())
    conn.request(fields)
    del conn.backend.vms[VM]
    _, seen, sent = conn.request(fields)
    assert seen is None and _status(sent) == 404


async def test_a_refused_stream_between_two_admitted_ones_leaves_no_stale_verdict(conn: Conn) -> None:
    token = conn.token()
    kept = conn.fields(token)
    refused = conn.fields(token, x_mvm_port="4000")  # a port the VM does not open
    _, first, _ = conn.request(kept)
    for _ in range(2):
        _, seen, sent = conn.request(refused)
        assert seen is None and _status(sent) == 403
        _, seen, _ = conn.request(kept)
        assert seen == first


async def test_a_header_list_once_kept_is_not_taken_for_a_later_kept_one(conn: Conn) -> None:
    token = conn.token()
    one, two = conn.fields(token, path="/one"), conn.fields(token, path="/two")
    for _ in range(2):
        for fields, path in ((one, b"/one"), (two, b"/two")):
            _, seen, _ = conn.request(fields)
            assert _target(seen) == path


async def test_a_verdict_kept_for_a_request_with_a_body_unties_the_kept_header_list(conn: Conn) -> None:
    token = conn.token()
    kept = conn.fields(token)
    conn.request(kept)
    conn.sid += 2
    upload = H2Stream(conn.core, conn.sid, conn.fields(token, method="PUT", path="/up"), False)  # type: ignore[arg-type]
    upload.start()  # admitted and kept by the admitter, its header list not tied (it has a body)
    assert conn.admissions == 2
    _, seen, _ = conn.request(kept)
    assert seen is not None and seen.startswith(b"GET /poll ")
    assert conn.admissions == 3


async def test_a_request_with_a_body_is_admitted_from_its_head(conn: Conn) -> None:
    fields = conn.fields(conn.token(), method="POST")
    conn.request(fields)
    conn.sid += 2
    stream = H2Stream(conn.core, conn.sid, list(fields), False)  # type: ignore[arg-type]
    stream.start()
    assert stream._head is not None and stream.ex.chunked
    assert conn.admissions == 2


# -- the kept answer ---------------------------------------------------------------------------


async def test_the_same_answer_again_is_sent_unparsed(conn: Conn) -> None:
    fields = conn.fields(conn.token())
    _, _, first = conn.request(fields)
    for _ in range(3):
        stream, _, sent = conn.request(fields)
        assert sent == [("head", conn.sid, 200, [(b"content-type", b"text/plain"), (b"content-length", b"5")], False),
                        ("body", conn.sid, b"hello", True)]  # fmt: skip
        assert stream._parser is None, "the answer was not parsed"
        assert conn.pool.idle_count(VM) == 1, "its connection went back to the pool"
    assert [s[2:] for s in first] == [s[2:] for s in sent]


async def test_a_changed_answer_is_parsed_anew(conn: Conn) -> None:
    fields = conn.fields(conn.token())
    conn.request(fields)
    stream, _, sent = conn.request(fields, OTHER)
    assert sent[-1] == ("body", conn.sid, b"world", True) and stream._parser is not None
    stream, _, sent = conn.request(fields, OTHER)
    assert sent[-1] == ("body", conn.sid, b"world", True) and stream._parser is None


async def test_a_head_request_parses_the_kept_answer_and_ends_with_its_head(conn: Conn) -> None:
    token = conn.token()
    conn.request(conn.fields(token), EMPTY)
    conn.request(conn.fields(token), EMPTY)
    stream, _, sent = conn.request(conn.fields(token, method="HEAD"), EMPTY)
    assert sent[0] == ("head", conn.sid, 200, [(b"content-length", b"0")], True)
    assert not any(s[0] == "body" and s[2] for s in sent)
    assert stream._parser is not None and conn.pool.idle_count(VM) == 0, "a HEAD's guest connection is not reused"


async def test_the_edges_set_cookie_is_per_exchange(conn: Conn) -> None:
    token = conn.token()
    by_header, by_query = conn.fields(token), conn.fields(None, path=f"/poll?token={token}")
    for fields, cookie in ((by_query, True), (by_header, False), (by_query, True), (by_header, False)):
        stream, _, sent = conn.request(fields)
        assert (stream._parser is None) is (stream.sid > 1), "answered from the kept answer after the first"
        names = [name for name, _ in sent[0][3]]
        assert (b"set-cookie" in names) is cookie
        assert names.count(b"set-cookie") <= 1


async def test_a_close_delimited_answer_is_never_kept(conn: Conn) -> None:
    fields = conn.fields(conn.token())
    unframed = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello"
    stream, _, _ = conn.request(fields, unframed)
    assert stream._upstream is not None and stream._upstream.answer is None


async def test_a_read_with_two_answers_is_never_kept(conn: Conn) -> None:
    fields = conn.fields(conn.token())
    stream, _, _ = conn.request(fields, OK + OTHER)
    assert stream._upstream is None and conn.pool.idle_count(VM) == 1
    assert conn.pool.acquire(VM, 8080, conn.now[0], 0).answer is None  # type: ignore[union-attr]


async def test_an_answer_past_the_kept_size_is_parsed_each_time(conn: Conn) -> None:
    fields = conn.fields(conn.token())
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000
    for _ in range(2):
        stream, _, sent = conn.request(fields, big)
        assert stream._parser is not None and sent[-1] == ("body", conn.sid, b"x" * 5000, True)
