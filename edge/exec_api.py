"""POST /v1/vms/{id}/exec: run a command in the guest and stream its output back as NDJSON.

Each line of the chunked answer is one JSON object, in the order the guest produced them:
  {"stream": "stdout" | "stderr", "data": "<base64>"}   output, never buffered whole
  {"exit_code": 3}                                        the end: the process's status
  {"exit_code": 137, "signal": "SIGKILL"}                 the end: killed by a signal
  {"error": "...", "timed_out": true?}                    the end: it could not run or finish
A request error (bad body, unknown VM) is an ordinary JSON error answer before streaming starts.
The exec wakes a suspended VM, keeps it awake while it runs, and is killed (its whole
process group) at its timeout or when the client goes away.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from vmm.agent import MAX_FRAME, AgentError, Exec, ExecEvent
from vmm.errors import InvalidRequest

from .backend import ManagedVms

MAX_TIMEOUT = 3600.0
DEFAULT_TIMEOUT = 300.0
MAX_STDIN = 16 * 1024 * 1024
MAX_ARGV_BYTES = MAX_FRAME - 64  # argv, env and cwd (NUL-terminated) fit one exec frame with its key and header
MAX_ID = 2**32 - 2  # a uid or gid: 32 bits, and (uid_t)-1 means "no change" to the kernel
CLIENT_CHECK_SECONDS = 0.5
_FIELDS = ("argv", "env", "cwd", "user", "stdin", "stdin_b64", "timeout")


@dataclass(frozen=True)
class ExecRequest:
    argv: list[str]
    env: list[str]
    cwd: str
    uid: int
    gid: int
    stdin: bytes
    timeout: float

    @classmethod
    def parse(cls, body: dict[str, Any]) -> ExecRequest:
        """Validate the request body; every error names the field."""
        unknown = sorted(set(body) - set(_FIELDS))
        if unknown:
            raise InvalidRequest(f"{unknown[0]}: unknown field (allowed: {', '.join(_FIELDS)})")
        argv = body.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and "\0" not in a for a in argv):
            raise InvalidRequest("argv must be a non-empty list of strings, e.g. [\"ls\", \"-l\"]")
        env = body.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise InvalidRequest("env must be an object of strings, e.g. {\"LANG\": \"C.UTF-8\"}")
        if any(not k or "=" in k or "\0" in k + v for k, v in env.items()):
            raise InvalidRequest("env names must be non-empty and without '=', names and values without NUL")
        cwd = body.get("cwd", "/")
        if not isinstance(cwd, str) or not cwd.startswith("/") or "\0" in cwd:
            raise InvalidRequest("cwd must be an absolute path")
        strings = [*argv, *(f"{k}={v}" for k, v in env.items()), cwd]
        size = sum(len(s.encode()) + 1 for s in strings)
        if size > MAX_ARGV_BYTES:
            raise InvalidRequest(f"argv: argv, env and cwd take {size} bytes; at most {MAX_ARGV_BYTES} fit one exec")
        uid, gid = parse_user(body.get("user", "0"))
        stdin = _stdin(body)
        timeout = body.get("timeout", DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= MAX_TIMEOUT:
            raise InvalidRequest(f"timeout must be a number of seconds in (0, {MAX_TIMEOUT:.0f}]")
        return cls(argv, strings[len(argv) : -1], cwd, uid, gid, stdin, float(timeout))


def parse_user(value: Any) -> tuple[int, int]:
    if value == "root":
        return 0, 0
    text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
    uid, _, gid = text.partition(":")
    if not uid.isascii() or not uid.isdigit() or (gid and not (gid.isascii() and gid.isdigit())):
        raise InvalidRequest(f"user must be \"root\", \"<uid>\" or \"<uid>:<gid>\", got {value!r}")
    if int(uid) > MAX_ID or int(gid or uid) > MAX_ID:
        raise InvalidRequest(f"user: uid and gid must be in 0..{MAX_ID}, got {value!r}")
    return int(uid), int(gid or uid)


def _stdin(body: dict[str, Any]) -> bytes:
    if "stdin" in body and "stdin_b64" in body:
        raise InvalidRequest("give stdin or stdin_b64, not both")
    if "stdin_b64" in body:
        try:
            data = base64.b64decode(body["stdin_b64"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise InvalidRequest("stdin_b64 must be base64") from None
    else:
        text = body.get("stdin", "")
        if not isinstance(text, str):
            raise InvalidRequest("stdin must be a string (or use stdin_b64 for bytes)")
        data = text.encode()
    if len(data) > MAX_STDIN:
        raise InvalidRequest(f"stdin is larger than {MAX_STDIN} bytes")
    return data


def event_line(event: ExecEvent) -> dict[str, Any]:
    if event.kind in ("stdout", "stderr"):
        return {"stream": event.kind, "data": base64.b64encode(event.data).decode()}
    if event.kind == "exit":
        if event.code < 0:
            return {"exit_code": 128 - event.code, "signal": event.signal_name}
        return {"exit_code": event.code}
    return {"error": event.data.decode(errors="replace")}


async def _relay(ex: Exec, response: web.StreamResponse) -> None:
    async for event in ex:
        await response.write(orjson.dumps(event_line(event)) + b"\n")


async def _client_gone(request: web.Request) -> None:
    """Returns once the client's connection is gone: a quiet command would not notice by itself."""
    while request.transport is not None and not request.transport.is_closing():
        await asyncio.sleep(CLIENT_CHECK_SECONDS)


async def stream_exec(request: web.Request, manager: ManagedVms, vm_id: str, req: ExecRequest) -> web.StreamResponse:
    """Start the exec, then stream its events until it ends, times out or the client leaves."""
    ex = await manager.exec(vm_id, req.argv, req.env, req.cwd, req.uid, req.gid)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    with manager.busy(vm_id):
        try:
            await response.prepare(request)
            await ex.write_stdin(req.stdin)
            await ex.write_stdin(b"")
            relay = asyncio.create_task(_relay(ex, response))
            gone = asyncio.create_task(_client_gone(request))
            try:
                async with asyncio.timeout(req.timeout):
                    await asyncio.wait((relay, gone), return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                relay.cancel()  # a no-op when it has finished
                await asyncio.gather(relay, gone, return_exceptions=True)
            if relay.cancelled():
                return response  # the client left while the command was quiet: the finally below kills it
            relay.result()
        except TimeoutError:
            await ex.kill()
            line = {"error": f"timed out after {req.timeout:g} s: its process group was killed", "timed_out": True}
            await response.write(orjson.dumps(line) + b"\n")
        except AgentError as exc:
            await response.write(orjson.dumps({"error": str(exc)}) + b"\n")
        except ConnectionError:
            return response  # the client left: the finally below kills what it started
        finally:
            if not ex.finished:
                await ex.abandon()
    await response.write_eof()
    return response
