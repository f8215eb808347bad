"""A gRPC service with one method of each kind, for the edge's end-to-end tests and bench.

Generic handlers with JSON (de)serialisers: no .proto file and no protoc step. Service `mvm.Demo`:
Echo (unary), Count (server-streaming), Sum (client-streaming), Chat (bidi), Fail (a status error
with a message), Slow (sleeps; for deadlines and cancels) and WasCancelled (whether a Slow call with
that id saw its client go away), so a test can observe that a cancel reached the server.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

PORT = int(os.environ.get("GRPC_PORT", "50051"))
SLOW_STEP = 0.05
_cancelled: dict[str, bool] = {}
_lock = threading.Lock()


def _load(data: bytes) -> Any:
    return json.loads(data) if data else {}


def _dump(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def echo(req: dict[str, Any], ctx: grpc.ServicerContext) -> dict[str, Any]:
    return {"echo": req, "metadata": {k: v for k, v in ctx.invocation_metadata() if k.startswith("x-")}}


def count(req: dict[str, Any], ctx: grpc.ServicerContext) -> Iterator[dict[str, Any]]:
    for i in range(int(req.get("n", 3))):
        yield {"i": i}


def total(reqs: Iterator[dict[str, Any]], ctx: grpc.ServicerContext) -> dict[str, Any]:
    values = [int(r.get("v", 0)) for r in reqs]
    return {"sum": sum(values), "count": len(values)}


def chat(reqs: Iterator[dict[str, Any]], ctx: grpc.ServicerContext) -> Iterator[dict[str, Any]]:
    for r in reqs:
        yield {"reply": r.get("say", "")}


def fail(req: dict[str, Any], ctx: grpc.ServicerContext) -> dict[str, Any]:
    code = getattr(grpc.StatusCode, str(req.get("code", "FAILED_PRECONDITION")), grpc.StatusCode.UNKNOWN)
    ctx.abort(code, str(req.get("message", "failed on purpose")))


def slow(req: dict[str, Any], ctx: grpc.ServicerContext) -> dict[str, Any]:
    """Sleeps `seconds`; a client that leaves first (deadline, cancel) is recorded under `id`."""
    call_id = str(req.get("id", ""))
    with _lock:
        _cancelled[call_id] = False
    deadline = time.monotonic() + float(req.get("seconds", 1))
    while time.monotonic() < deadline:
        if not ctx.is_active():
            with _lock:
                _cancelled[call_id] = True
            return {}
        time.sleep(SLOW_STEP)
    return {"slept": req.get("seconds", 1)}


def was_cancelled(req: dict[str, Any], ctx: grpc.ServicerContext) -> dict[str, Any]:
    with _lock:
        return {"seen": str(req.get("id", "")) in _cancelled, "cancelled": _cancelled.get(str(req.get("id", "")))}


def main() -> None:
    kw = {"request_deserializer": _load, "response_serializer": _dump}
    handler = grpc.method_handlers_generic_handler(
        "mvm.Demo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo, **kw),
            "Count": grpc.unary_stream_rpc_method_handler(count, **kw),
            "Sum": grpc.stream_unary_rpc_method_handler(total, **kw),
            "Chat": grpc.stream_stream_rpc_method_handler(chat, **kw),
            "Fail": grpc.unary_unary_rpc_method_handler(fail, **kw),
            "Slow": grpc.unary_unary_rpc_method_handler(slow, **kw),
            "WasCancelled": grpc.unary_unary_rpc_method_handler(was_cancelled, **kw),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"0.0.0.0:{PORT}")
    server.start()
    print(f"grpc-app serving on {PORT}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
