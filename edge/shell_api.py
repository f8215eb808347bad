"""GET /v1/vms/{id}/shell: an interactive terminal in the guest, over a WebSocket.

The guest agent runs a login shell on a pty (bash if the image has it, else sh). On the
WebSocket, binary messages are terminal bytes both ways (Ctrl-C is just byte 0x03: the
guest's tty turns it into SIGINT); text messages are JSON: {"resize": [cols, rows]} from
the client, and at the end {"exit_code": n[, "signal": name]} or {"error": ...} from here.
Without an Upgrade header the same path answers a minimal terminal page for a browser:
`https://<vm-id>.<domain>/.mvm/shell?token=<shell-scoped token>`.
"""

from __future__ import annotations

import asyncio
import contextlib

import orjson
from aiohttp import WSMsgType, web

from vmm.agent import Exec
from vmm.errors import InvalidRequest

from .backend import ManagedVms
from .exec_api import parse_user

SHELL = ["/bin/sh", "-c", "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi"]
ENV = ["TERM=xterm-256color", "HOME=/root", "LANG=C.UTF-8"]

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>shell</title>
<style>
  html, body { margin: 0; height: 100%; background: #111; color: #ddd; }
  #screen { margin: 0; padding: 6px; height: calc(100% - 12px); overflow-y: auto; white-space: pre-wrap;
            word-break: break-all; font: 14px/1.25 monospace; outline: none; }
</style></head>
<body><pre id="screen" tabindex="0"></pre>
<script>
  // A minimal terminal: bytes to the shell as typed, its output shown as text (escape sequences
  // dropped). The WebSocket speaks raw terminal bytes, so a full emulator such as xterm.js
  // can replace this page unchanged.
  const screen = document.getElementById("screen");
  const decoder = new TextDecoder("utf-8"), encoder = new TextEncoder();
  const keys = {Enter: "\\r", Backspace: "\\x7f", Tab: "\\t", Escape: "\\x1b", ArrowUp: "\\x1b[A",
                ArrowDown: "\\x1b[B", ArrowRight: "\\x1b[C", ArrowLeft: "\\x1b[D"};
  window.mvmOutput = "";
  const cell = () => { const r = screen.getBoundingClientRect(); return [Math.max(20, Math.floor(r.width / 8.4)),
                                                                           Math.max(5, Math.floor(r.height / 17.5))]; };
  const [cols, rows] = cell();
  const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host +
                           location.pathname + "?cols=" + cols + "&rows=" + rows);
  ws.binaryType = "arraybuffer";
  const show = (text) => {
    window.mvmOutput += text;
    let out = screen.textContent;
    for (const ch of text.replace(/\\x1b\\[[0-9;?]*[ -\\/]*[@-~]|\\x1b\\][^\\x07]*\\x07|\\r/g, "")) {
      if (ch === "\\b") out = out.slice(0, -1);
      else if (ch !== "\\x07") out += ch;
    }
    screen.textContent = out;
    screen.scrollTop = screen.scrollHeight;
  };
  ws.onmessage = (event) => {
    if (typeof event.data === "string") {
      const end = JSON.parse(event.data);
      show("\\n[" + ("exit_code" in end ? "exited " + end.exit_code : "error: " + end.error) + "]\\n");
    } else {
      show(decoder.decode(new Uint8Array(event.data), {stream: true}));
    }
  };
  ws.onclose = () => show("\\n[disconnected]\\n");
  const send = (text) => ws.readyState === 1 && ws.send(encoder.encode(text));
  screen.addEventListener("keydown", (e) => {
    let data = keys[e.key];
    if (e.ctrlKey && e.key.length === 1) data = String.fromCharCode(e.key.toUpperCase().charCodeAt(0) - 64);
    else if (!data && e.key.length === 1 && !e.metaKey) data = e.key;
    if (data) { e.preventDefault(); send(data); }
  });
  screen.addEventListener("paste", (e) => { e.preventDefault(); send(e.clipboardData.getData("text")); });
  window.addEventListener("resize", () => ws.readyState === 1 && ws.send(JSON.stringify({resize: cell()})));
  screen.focus();
</script></body></html>
"""


def _size(request: web.Request) -> tuple[int, int]:
    try:
        cols, rows = int(request.query.get("cols", "80")), int(request.query.get("rows", "24"))
    except ValueError:
        raise InvalidRequest("cols and rows must be whole numbers") from None
    if not (1 <= cols <= 1000 and 1 <= rows <= 1000):
        raise InvalidRequest("cols and rows must be in [1, 1000]")
    return rows, cols


async def _pump(ex: Exec, ws: web.WebSocketResponse) -> None:
    """Guest output to the client, then how the shell ended."""
    async for event in ex:
        if event.kind in ("stdout", "stderr"):
            await ws.send_bytes(event.data)
        elif event.kind == "exit":
            end = {"exit_code": 128 - event.code if event.code < 0 else event.code}
            if event.code < 0:
                end["signal"] = event.signal_name  # type: ignore[assignment]
            await ws.send_str(orjson.dumps(end).decode())
        else:
            await ws.send_str(orjson.dumps({"error": event.data.decode(errors="replace")}).decode())
    await ws.close()


class ShellApi:
    def __init__(self, manager: ManagedVms) -> None:
        self.manager = manager

    async def shell(self, request: web.Request) -> web.StreamResponse:
        vm_id = request.match_info["vm_id"]
        self.manager.get(vm_id)
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(text=PAGE, content_type="text/html")
        rows, cols = _size(request)
        uid, gid = parse_user(request.query.get("user", "0"))
        ex = await self.manager.exec(vm_id, SHELL, ENV, "/", uid, gid, pty=(rows, cols))
        ws = web.WebSocketResponse(max_msg_size=1 << 20, heartbeat=30)
        await ws.prepare(request)
        with self.manager.busy(vm_id):
            pump = asyncio.create_task(_pump(ex, ws))
            try:
                async for msg in ws:
                    if msg.type == WSMsgType.BINARY:
                        await ex.write_stdin(msg.data)
                    elif msg.type == WSMsgType.TEXT:
                        resize = orjson.loads(msg.data).get("resize")
                        if isinstance(resize, list) and len(resize) == 2:
                            await ex.resize(int(resize[1]), int(resize[0]))
            except (ValueError, AttributeError):
                await ws.close(message=b"text messages must be JSON like {\"resize\": [cols, rows]}")
            finally:
                if not pump.done():
                    pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
                if not ex.finished:
                    await ex.abandon()  # the client left: the shell and what it started are killed
        return ws


def add_routes(app: web.Application, manager: ManagedVms) -> None:
    api = ShellApi(manager)
    app.router.add_get("/v1/vms/{vm_id}/shell", api.shell)
