"""GET /v1/events: the lifecycle event feed as Server-Sent Events, or the retained backlog as JSON.

Filters `vm` and `type` (repeatable or comma-separated); `Last-Event-ID` (or `?after=`) resumes
after that seq: the retained events after it come first, then each new one as it is recorded,
so a client that reconnects with the last id it saw misses nothing. An idle stream gets a
`: keepalive` comment every [events] keepalive seconds, so proxies and clients see it alive.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from vmm.events import EVENT_TYPES, EventRing

EVENTS = web.AppKey("events", EventRing)
KEEPALIVE = web.AppKey("events_keepalive", float)
_STOPPING = web.AppKey("events_stopping", asyncio.Event)


def _listed(request: web.Request, name: str) -> set[str]:
    return {item for value in request.query.getall(name, []) for item in value.split(",") if item}


def _after(request: web.Request) -> int:
    given = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
    if not given.isdigit():
        raise web.HTTPUnprocessableEntity(reason=f"Last-Event-ID / after: must be an event seq, got {given!r}")
    return int(given)


async def events(request: web.Request) -> web.StreamResponse:
    ring = request.app[EVENTS]
    vms, types = _listed(request, "vm"), _listed(request, "type")
    unknown = sorted(types - set(EVENT_TYPES))
    if unknown:
        known = ", ".join(EVENT_TYPES)
        raise web.HTTPUnprocessableEntity(reason=f"type: unknown event type {unknown[0]!r} (known: {known})")
    seq = _after(request)
    if request.query.get("follow", "1") in ("0", "false"):
        body = b'{"events":[' + b",".join(ev.to_json() for ev in ring.after(seq, vms, types)) + b"]}"
        return web.Response(body=body, content_type="application/json")
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    stopping = request.app[_STOPPING]
    while not stopping.is_set():
        backlog = ring.after(seq, vms, types)
        if backlog:
            await response.write(b"".join(b"id: %d\nevent: %s\ndata: %s\n\n" % (ev.seq, ev.type.encode(), ev.to_json())
                                          for ev in backlog))  # fmt: skip
        seq = max(seq, ring.last_seq)
        if not await _wait(ring, seq, stopping, request.app[KEEPALIVE]):
            await response.write(b": keepalive\n\n")
    return response


async def _wait(ring: EventRing, seq: int, stopping: asyncio.Event, timeout: float) -> bool:
    """True when an event after `seq` arrived or the server stops; False after `timeout` of neither."""
    arrived = asyncio.ensure_future(ring.wait(seq, timeout))
    stopped = asyncio.ensure_future(stopping.wait())
    try:
        done, _ = await asyncio.wait((arrived, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (arrived, stopped):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return stopped in done or bool(arrived in done and arrived.result())


async def _stop_streams(app: web.Application) -> None:
    app[_STOPPING].set()


def add_routes(app: web.Application, ring: EventRing, keepalive: float) -> None:
    """GET /v1/events over `ring`; open streams end when the app shuts down."""
    app[EVENTS], app[KEEPALIVE], app[_STOPPING] = ring, keepalive, asyncio.Event()
    app.on_shutdown.append(_stop_streams)
    app.router.add_get("/v1/events", events)
