"""The shell page in a real browser: headless Chromium opens /.mvm/shell with a shell-scoped token,
types a command key by key, and sees its output come back from a real guest.

Chromium (Debian's package, installed by scripts/install.sh) is driven over its DevTools
protocol on 127.0.0.1; *.localhost names resolve to loopback in Chromium, so nothing but
this machine is ever reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.edge_harness import edge_config, running_edge
from vmm.settings import VmmSettings

CHROMIUM = shutil.which("chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
    "--disable-background-networking", "--disable-component-update", "--ignore-certificate-errors",
    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
]  # fmt: skip


class DevTools:
    """The few DevTools calls the tests need, over one page's WebSocket; `events`: the protocol events read past."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self.next_id = ws, 0
        self.events: list[dict[str, Any]] = []

    async def call(self, method: str, **params: Any) -> Any:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            reply = await self.ws.receive_json()
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    async def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise
        )
        return result["result"].get("value")

    async def type(self, text: str) -> None:
        for ch in text:
            await self.call("Input.dispatchKeyEvent", type="keyDown", key=ch, text=ch)
        await self.call("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13)


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[DevTools]:
    assert CHROMIUM is not None
    profile = Path(tempfile.mkdtemp(prefix="mvm-chromium-"))
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "TMPDIR": str(profile)},  # its own temporary files go with the profile
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        async with asyncio.timeout(30):
            while not port_file.exists() or not port_file.read_text().strip():
                await asyncio.sleep(0.1)
        port = port_file.read_text().split()[0]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                pages = [t for t in await resp.json() if t["type"] == "page"]
            async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                yield DevTools(ws)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


async def _wait_for(tools: DevTools, needle: str, timeout: float = 30.0) -> str:
    async with asyncio.timeout(timeout):
        while True:
            output = await tools.evaluate("window.mvmOutput || ''")
            if needle in output:
                return str(output)
            await asyncio.sleep(0.2)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is installed by scripts/install.sh")
async def test_browser_shell_page_runs_commands_in_the_vm(settings: VmmSettings, sandbox_template: str) -> None:
    async with running_edge(edge_config(settings)) as client:
        vm_id = (await client.api("POST", "/v1/vms", {"template": sandbox_template}, status=201))["id"]
        token = (await client.api("POST", f"/v1/vms/{vm_id}/tokens", {"scopes": ["shell"]}, status=201))["token"]
        page = client.vm_url(vm_id, f"/.mvm/shell?token={token}")  # the token becomes a cookie for the WebSocket
        async with chromium() as tools:
            await tools.call("Page.enable")
            await tools.call("Page.navigate", url=page)
            await _wait_for(tools, "#")  # root's prompt
            await tools.type("echo from-the-browser-$((6*7)); hostname")
            output = await _wait_for(tools, "from-the-browser-42")
            await _wait_for(tools, vm_id)
            await tools.type("exit 3")
            output = await _wait_for(tools, "[exited 3]")
            assert "from-the-browser-42" in output
