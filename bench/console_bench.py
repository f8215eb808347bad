"""The web console's first load: bytes transferred and time to interactive, in headless Chromium on loopback.

One real edge (TLS on 127.0.0.1, its default demo template booted once), one Chromium. Each run
clears the browser's cache and cookies and loads https://api.<domain>/console twice: signed out
(the sign-in form) and, after signing in, signed in (the VM table with the templates and images).
Bytes are what went over the wire (Chromium's encodedDataLength: headers and gzipped bodies);
time to interactive is the page's own `mvm-interactive` mark (the form or the table shown), from
the start of navigation. xterm.js is loaded only when a VM page opens; its bytes are listed apart.
Usage: .venv/bin/python -m bench.console_bench [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from edge import console
from tests.e2e.edge_harness import CONTROL, LoopbackResolver, edge_config, running_edge
from tests.e2e.test_shell_browser import DevTools, chromium
from vmm.settings import VmmSettings

from .stats import median, table
from .tools import state_dir

BUDGET = 300 * 1024  # bytes of a first load (issue 16)
MARK = "performance.getEntriesByName('mvm-interactive').map((m) => m.startTime)[0]"


async def _load(tools: DevTools, url: str) -> tuple[int, float]:
    """Navigate with a cold cache; the bytes of every finished request and the interactive mark (ms)."""
    tools.events.clear()
    await tools.call("Page.navigate", url=url)
    async with asyncio.timeout(60):
        while (await tools.evaluate(MARK)) is None:
            await asyncio.sleep(0.05)
    mark = float(await tools.evaluate(MARK))
    await asyncio.sleep(0.5)  # requests started by the page after the mark (e.g. metrics) finish and count
    await tools.evaluate("1")  # reads the protocol events that came meanwhile
    sizes = [e["params"]["encodedDataLength"] for e in tools.events if e["method"] == "Network.loadingFinished"]
    return int(sum(sizes)), mark


async def _xterm_bytes(url: str, cafile: Path) -> int:
    """What a VM page adds, gzipped: xterm.js, its fit add-on and its CSS."""
    connector = aiohttp.TCPConnector(resolver=LoopbackResolver(), ssl=ssl.create_default_context(cafile=str(cafile)))
    total = 0
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as http:
        for name in ("vendor/xterm.mjs", "vendor/addon-fit.mjs", "vendor/xterm.css"):
            async with http.get(f"{url}/{name}", headers={"Accept-Encoding": "gzip"}) as resp:
                total += len(await resp.read())
    return total


async def run(runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mvm-console-bench-", dir="/tmp") as tmp:
        settings = VmmSettings(state_dir=state_dir(Path(tmp) / "state"))
        cfg = edge_config(settings)
        async with running_edge(cfg) as client, chromium() as tools:
            url = f"https://{CONTROL}:{client.edge.port}/console"
            await tools.call("Network.enable")
            await tools.call("Network.setCacheDisabled", cacheDisabled=True)
            await tools.call("Page.enable")
            signed_out: list[tuple[int, float]] = []
            signed_in: list[tuple[int, float]] = []
            for _ in range(runs):
                await tools.call("Network.clearBrowserCookies")
                signed_out.append(await _load(tools, url))
                key = json.dumps(cfg.server.admin_key)
                await tools.evaluate(f"document.getElementById('key').value = {key};"
                                     "document.getElementById('sign-in').requestSubmit()")  # fmt: skip
                async with asyncio.timeout(30):
                    while not await tools.evaluate("!!document.querySelector('#vm-table')"):
                        await asyncio.sleep(0.05)
                signed_in.append(await _load(tools, url))
            xterm = await _xterm_bytes(url, cfg.server.tls_cert)
    return {"signed_out": signed_out, "signed_in": signed_in, "xterm_bytes": xterm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not console.load_assets():
        raise SystemExit("console_bench: the console's files are not installed: run scripts/install.sh")
    result = uvloop.run(run(max(1, min(args.runs, 100))))
    rows = []
    for name, loads in (("sign-in page", result["signed_out"]), ("signed in: VM table", result["signed_in"])):
        size = median([float(b) for b, _ in loads])
        rows.append([name, str(len(loads)), f"{size / 1024:.1f}", "yes" if size < BUDGET else "NO",
                     f"{median([t for _, t in loads]):.0f}"])  # fmt: skip
    with_vm = median([float(b) for b, _ in result["signed_in"]]) + result["xterm_bytes"]
    rows.append(["+ a VM page's xterm.js, fit add-on and CSS (gzipped, loaded once)", "1",
                 f"{result['xterm_bytes'] / 1024:.1f}", "", ""])  # fmt: skip
    rows.append(["table, then a VM page", "", f"{with_vm / 1024:.1f}", "yes" if with_vm < BUDGET else "NO", ""])
    print(table(["first load", "n", "KiB transferred (median)", "< 300 KB", "interactive ms (median)"], rows))


if __name__ == "__main__":
    main()
