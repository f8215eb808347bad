"""Relaying one upstream answer to the client as bytes, knowing where it ends.

Response bytes go to the client as they come; the upstream connection's `ResponseTracker`
(llhttp) only finds where the answer ends. The head is held back until it is whole only
when the edge must change it (a Set-Cookie line to add) or end the answer at it (HEAD).
An answer that is, byte for byte, the upstream connection's last one that came whole in one
read (a polled URL's) ends where that one did, without llhttp (`ResponseTracker.again`).
"""

from __future__ import annotations

from collections.abc import Callable

from httptools.parser.errors import HttpParserError, HttpParserUpgrade

from .exchange import Exchange, ExchangeState
from .upstream import ResponseTracker, take_head

# What `ResponseRelay.feed` found.
GOING_ON = 0  # the answer goes on
DONE = 1  # the answer is complete
UPGRADED = 2  # a 101 went to the client: what follows is not HTTP
INVALID = 3  # not a valid HTTP answer: `ResponseRelay.problem` says why

_FORWARDED = ExchangeState.FORWARDED
_STREAMING = ExchangeState.STREAMING


class ResponseRelay:
    """The answer to the exchange being answered, on its way from the upstream to the client.

    One per client connection, started again for each exchange, so relaying allocates
    nothing per request. `send` writes to the client; `count_status` is told the status of
    each answer whose final head went out.
    """

    __slots__ = ("count_status", "exchange", "fresh", "head", "max_head_size", "problem", "rest", "send", "tracker")

    def __init__(
        self, send: Callable[[bytes], object], count_status: Callable[[int], None], max_head_size: int
    ) -> None:
        self.send = send
        self.count_status = count_status
        self.max_head_size = max_head_size
        self.exchange: Exchange | None = None
        self.tracker: ResponseTracker | None = None
        self.head: bytearray | None = None  # the response head being collected, when it must be whole
        self.rest = b""  # bytes that came after a 101's head, for the tunnel
        self.problem = ""
        self.fresh = False  # nothing of the answer has come yet

    def start(self, exchange: Exchange, tracker: ResponseTracker) -> None:
        self.exchange = exchange
        self.tracker = tracker
        tracker.reset()
        self.head = bytearray() if exchange.is_head or exchange.cookie is not None else None
        self.fresh = True

    def collecting_head(self) -> bool:
        return self.head is not None

    def feed(self, data: bytes) -> int:
        """Pass on response bytes; GOING_ON, DONE, UPGRADED or INVALID."""
        if self.head is not None:
            return self._collect_head(data)
        tracker = self.tracker
        assert tracker is not None
        fresh, self.fresh = self.fresh, False
        if fresh and data == tracker.repeat:  # the upstream's last answer again (a polled URL)
            tracker.again()
            self._send(data)
            return DONE
        try:
            tracker.parser.feed_data(data)  # ResponseTracker.feed, one call less on the hot path
        except HttpParserUpgrade:
            self._send(data)
            self.rest = b""
            return UPGRADED
        except HttpParserError as exc:
            self.problem = str(exc)
            return INVALID
        self._send(data)
        if tracker.done:
            if fresh:
                tracker.keep(data)
            return DONE
        return GOING_ON

    def _send(self, data: bytes) -> None:
        self.send(data)
        ex = self.exchange
        assert ex is not None
        if not ex.status:  # the first bytes of an answer, or those after an interim 1xx
            if ex.state is _FORWARDED:
                ex.move(_STREAMING)
            tracker = self.tracker
            assert tracker is not None
            if tracker.final:
                ex.status = tracker.status
                self.count_status(tracker.status)

    def _collect_head(self, data: bytes) -> int:
        """Hold response bytes until the final head is whole, to add Set-Cookie or end a HEAD."""
        ex = self.exchange
        tracker = self.tracker
        buf = self.head
        assert ex is not None and tracker is not None and buf is not None
        self.fresh = False  # an answer taken apart here is never recognised whole
        buf += data
        while True:
            head = take_head(buf)
            if head is None:
                if len(buf) > self.max_head_size:
                    self.problem = "the response head is too large"
                    return INVALID
                return GOING_ON
            try:
                upgraded = tracker.feed(head)
            except HttpParserError as exc:
                self.problem = str(exc)
                return INVALID
            if tracker.final:
                break
            self._send(head)  # an interim 1xx, e.g. 100 Continue: pass it on now
        self.head = None
        rest = bytes(buf)
        if ex.cookie is not None:
            eol = head.index(b"\r\n") + 2
            head = head[:eol] + ex.cookie + head[eol:]
        self._send(head)
        if upgraded:
            self.rest = rest
            return UPGRADED
        if ex.is_head or tracker.done:
            tracker.head_ends_it(bool(rest))
            return DONE
        if rest:
            return self.feed(rest)
        return GOING_ON

    def stop(self) -> None:
        """The answer is over or abandoned: nothing is held for it any more."""
        self.head = None
        self.rest = b""
