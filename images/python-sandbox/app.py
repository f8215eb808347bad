"""A code-interpreter session: run Python in a namespace that persists, read and write files.

Stdlib only. One process holds the namespace, so variables survive between requests and,
because microvm-edge snapshots the whole VM, across suspend and restore too.

  POST /run          {"code": "..."} -> {"stdout", "stderr", "result", "error"}
  PUT  /files/<path> body -> written atomically under $SANDBOX_DATA (default /data)
  GET  /files/<path> -> the file's bytes
  GET  /             -> who is answering: pid, process start time, boot id, run count
  GET  /healthz      -> {"ok": true}
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import socket
import sys
import tempfile
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DATA = Path(os.environ.get("SANDBOX_DATA", "/data"))
MAX_BODY = 64 * 1024 * 1024

namespace: dict[str, object] = {"__name__": "__sandbox__"}
run_lock = threading.Lock()  # one namespace: runs take turns
runs = 0


def process_start_ticks() -> int:
    """Start time of this process in clock ticks since boot: a restarted app would differ."""
    stat = Path("/proc/self/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[19])


START_TICKS = process_start_ticks()


def run_code(code: str) -> dict[str, object]:
    """exec the code; like a notebook cell, the value of a final expression is the result."""
    global runs
    out, err = io.StringIO(), io.StringIO()
    result: object = None
    error = None
    with run_lock, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        runs += 1
        try:
            tree = ast.parse(code, "<run>", "exec")
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, "<run>", "exec"), namespace)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), "<run>", "eval"), namespace)
                result = None if value is None else repr(value)
        except BaseException:  # the session outlives any error in user code, SystemExit included
            error = traceback.format_exc()
    return {"stdout": out.getvalue(), "stderr": err.getvalue(), "result": result, "error": error}


def data_path(raw: str) -> Path | None:
    """A path under DATA, or None if it would leave it."""
    target = (DATA / raw.lstrip("/")).resolve()
    return target if target == DATA.resolve() or DATA.resolve() in target.parents else None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        # sys.__stdout__: during a run sys.stdout is that run's capture
        print(f"{self.address_string()} {format % args}", file=sys.__stdout__, flush=True)

    def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def reply_json(self, status: int, data: object) -> None:
        self.reply(status, json.dumps(data).encode() + b"\n")

    def body(self) -> bytes | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.reply_json(413, {"error": f"body larger than {MAX_BODY} bytes"})
            return None
        return self.rfile.read(length)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self.reply_json(200, {"ok": True})
        elif self.path == "/":
            boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
            self.reply_json(200, {"pid": os.getpid(), "start_ticks": START_TICKS, "boot_id": boot_id,
                                  "hostname": socket.gethostname(), "runs": runs})
        elif self.path.startswith("/files/"):
            target = data_path(self.path[len("/files/"):])
            if target is None:
                self.reply_json(400, {"error": "path leaves the data directory"})
            elif not target.is_file():
                self.reply_json(404, {"error": f"no file {self.path[len('/files/'):]}"})
            else:
                self.reply(200, target.read_bytes(), "application/octet-stream")
        else:
            self.reply_json(404, {"error": "not found"})

    def do_PUT(self) -> None:
        if not self.path.startswith("/files/"):
            self.reply_json(404, {"error": "not found"})
            return
        target = data_path(self.path[len("/files/"):])
        body = self.body()
        if body is None:
            return
        if target is None or target == DATA.resolve():
            self.reply_json(400, {"error": "path leaves the data directory"})
            return
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            self.reply_json(507 if exc.errno == 28 else 500, {"error": f"{exc.strerror}: {exc.filename}"})
            return
        self.reply_json(201, {"path": str(target), "bytes": len(body)})

    def do_POST(self) -> None:
        if self.path != "/run":
            self.reply_json(404, {"error": "not found"})
            return
        body = self.body()
        if body is None:
            return
        try:
            code = json.loads(body)["code"]
            if not isinstance(code, str):
                raise TypeError("code must be a string")
        except (ValueError, KeyError, TypeError) as exc:
            self.reply_json(400, {"error": f'send {{"code": "..."}}: {exc}'})
            return
        self.reply_json(200, run_code(code))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("0.0.0.0", args.port), Handler)
    server.daemon_threads = True
    print(f"python-sandbox listening on :{args.port} (pid {os.getpid()}, data in {DATA})", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
