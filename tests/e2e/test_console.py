"""The web console in a real browser, against a real edge and a real python-sandbox guest.

Headless Chromium (driven over its DevTools protocol, as test_shell_browser does) signs in at
https://api.<domain>/console, creates a VM with a short idle policy and watches its row turn
suspended from the event feed, without a reload; opens the VM's terminal (xterm.js on the shell
WebSocket, which wakes the VM), reads 42 from xterm's buffer, runs a full-screen program and
quits it; checks the cookie's flags and that a same-site page cannot POST with the cookie alone;
signs out. Screenshots go to test-artifacts/console/ (git-ignored).
"""

from __future__ import annotations

import asyncio
import base64
import json
import warnings
from pathlib import Path
from typing import Any

import pytest

from edge import console
from tests.e2e.edge_harness import CONTROL, DOMAIN, Client, edge_config, running_edge
from tests.e2e.test_shell_browser import CHROMIUM, DevTools, chromium
from vmm.settings import VmmSettings

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
SCREEN = """(() => { const b = window.mvmTerm ? window.mvmTerm.buffer.active : null; if (!b) return "";
  const out = []; for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));
  return out.join("\\n"); })()"""
PROMPT_AT_CURSOR = """(() => { const b = window.mvmTerm.buffer.active;
  return b.getLine(b.baseY + b.cursorY).translateToString(true).trimEnd().endsWith("#"); })()"""
# A full-screen curses program for an image without `top`: the alternate screen, colours, a key to quit.
CURSES = (
    "python3 -c 'import curses; curses.wrapper(lambda s: (curses.start_color(), "
    "curses.init_pair(1, curses.COLOR_RED, curses.COLOR_BLACK), "
    's.addstr(0, 0, "FULL" + "-SCREEN", curses.color_pair(1)), s.refresh(), s.getch()))\''
)


async def _settle(tools: DevTools, expression: str) -> Any:
    """The value of the promise the expression makes."""
    result = await tools.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
    return result["result"].get("value")


async def _key(tools: DevTools, key: str) -> None:
    await tools.call("Input.dispatchKeyEvent", type="keyDown", key=key, text=key)


async def _until(tools: DevTools, expression: str, what: str, timeout: float = 60.0) -> Any:
    """Poll a page expression until it is truthy (bounded); the failure names what was awaited."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                value = await tools.evaluate(expression)
                if value:
                    return value
                await asyncio.sleep(0.2)
    except TimeoutError:
        body = await tools.evaluate("document.body.innerText")
        raise AssertionError(f"timed out waiting for {what}; the page shows:\n{body}") from None


async def _screen_has(tools: DevTools, needle: str, what: str) -> str:
    return str(await _until(tools, f"(() => {{ const s = {SCREEN}; return s.includes({json.dumps(needle)}) && s; }})()",
                            what))  # fmt: skip


async def _screenshot(tools: DevTools, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = await tools.call("Page.captureScreenshot", format="png")
    (ARTIFACTS / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))


async def _full_screen_program(tools: DevTools) -> str:
    """`top` if the image has it (procps), else a curses program: the alternate screen, then `q` back to the shell."""
    await tools.type("command -v top >/dev/null && echo has-$((1+1))-top || echo no-$((1+1))-top")
    which = (f"(() => {{ const s = {SCREEN}; "
             "return s.includes('has-2-top') ? 'top' : s.includes('no-2-top') && 'curses'; })()")  # fmt: skip
    found = await _until(tools, which, "whether the image has top")
    if found == "top":
        await tools.type("top")
        await _screen_has(tools, "PID", "top's process table")
    else:
        warnings.warn("python-sandbox has no `top` (procps): ran a curses full-screen program instead", stacklevel=1)
        await tools.type(CURSES)
        await _screen_has(tools, "FULL-SCREEN", "the curses program's screen")
    if found == "curses":  # procps' top draws over the normal screen; curses takes the alternate one
        assert await tools.evaluate("window.mvmTerm.buffer.active.type") == "alternate"
    await _screenshot(tools, f"3-{found}")
    await _key(tools, "q")
    await _until(tools, "window.mvmTerm.buffer.active.type === 'normal'", f"{found} to quit on q")
    # top draws on the normal screen, so that says nothing of it: the shell's prompt on the cursor's line
    # does (typed before top exits, the next line would be read, and dropped, by top with the q)
    await _until(tools, PROMPT_AT_CURSOR, f"the shell's prompt after {found} quit")
    await tools.type("echo back-$((2+3))")
    await _screen_has(tools, "back-5", "the shell after the full-screen program")
    return str(found)


async def _cross_site_post_is_refused(tools: DevTools, client: Client, console_url: str) -> None:
    """A page of another origin under the same site (a VM's own host name) POSTs with the cookie: 403, no VM."""
    before = len((await client.api("GET", "/v1/vms", status=200))["vms"])
    await tools.call("Network.enable")
    await tools.call("Page.navigate", url=client.vm_url("not-a-vm"))
    await _until(tools, f"location.host.startsWith('not-a-vm.{DOMAIN}')", "the other origin's page")
    target = console_url.replace("/console", "/v1/vms")
    sent = await _settle(
        tools,
        f"fetch({json.dumps(target)}, {{method: 'POST', mode: 'no-cors', credentials: 'include', "
        "headers: {'Content-Type': 'text/plain'}, body: JSON.stringify({template: 'sandbox'})})"
        ".then(() => 'sent', (e) => String(e))"
    )
    assert sent == "sent"
    answers = [e["params"]["response"] for e in tools.events if e["method"] == "Network.responseReceived"]
    refused = [a for a in answers if a["url"] == target]
    assert refused and refused[-1]["status"] == 403, answers  # 403: the cookie went along and was not enough
    await tools.call("Network.disable")
    assert len((await client.api("GET", "/v1/vms", status=200))["vms"]) == before


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is installed by scripts/install.sh")
async def test_console_signs_in_follows_the_feed_and_opens_a_real_terminal(
    settings: VmmSettings, sandbox_template: str
) -> None:
    async with running_edge(edge_config(settings)) as client, chromium() as tools:
        url = f"https://{CONTROL}:{client.edge.port}/console"
        await tools.call("Page.enable")
        await tools.call("Emulation.setDeviceMetricsOverride", width=1280, height=800, deviceScaleFactor=1,
                         mobile=False)  # fmt: skip
        await tools.call("Page.navigate", url=url)
        await _until(tools, "!document.getElementById('sign-in').hidden", "the sign-in form")

        await tools.evaluate("document.getElementById('key').value = 'not-the-admin-key-0000';"
                             "document.getElementById('sign-in').requestSubmit()")  # fmt: skip
        await _until(tools, "document.getElementById('sign-in-error').textContent.includes('wrong admin key')",
                     "the wrong key's refusal")  # fmt: skip
        assert not (await tools.call("Network.getCookies", urls=[url]))["cookies"]

        key = client.edge.cfg.server.admin_key
        await tools.evaluate(f"document.getElementById('key').value = {json.dumps(key)};"
                             "document.getElementById('sign-in').requestSubmit()")  # fmt: skip
        await _until(tools, "document.querySelector('#vm-table') && document.getElementById('feed').textContent",
                     "the VM table and its feed")  # fmt: skip
        assert await tools.evaluate("document.getElementById('feed').textContent") == "live"
        cookies = (await tools.call("Network.getCookies", urls=[url]))["cookies"]
        (cookie,) = [c for c in cookies if c["name"] == console.COOKIE]
        assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"], cookie["path"]) == (True, True, "Strict", "/")
        assert cookie["value"] != key and cookie["expires"] > 0
        page_text = await tools.evaluate("document.cookie + location.href + document.documentElement.outerHTML")
        assert key not in page_text and cookie["value"] not in page_text
        templates = await tools.evaluate("[...document.querySelectorAll('#templates td:first-child')]"
                                         ".map((td) => td.textContent)")  # fmt: skip
        assert sandbox_template in templates

        await tools.evaluate("window.notReloaded = true;"
                             f"document.getElementById('create-template').value = {json.dumps(sandbox_template)};"
                             "document.getElementById('create-policy').value = '{\"idle_suspend_after\": 1}';"
                             "document.getElementById('create').click()")  # fmt: skip
        vm_id = await _until(tools, "document.querySelector('#vm-table tr[data-vm]')?.dataset.vm", "the new VM's row")
        await _screenshot(tools, "1-table")
        await _until(tools, f"document.querySelector('tr[data-vm=\"{vm_id}\"] .state')?.dataset.state === 'suspended'",
                     "the row to turn suspended")  # fmt: skip
        assert await tools.evaluate("window.notReloaded") is True  # the feed changed the row, not a reload
        await _screenshot(tools, "2-suspended")
        await tools.evaluate(f"document.querySelector('tr[data-vm=\"{vm_id}\"] [data-action=token]').click()")
        token = await _until(tools, "document.getElementById('token-dialog').open && "
                                    "document.getElementById('token-value').value", "the issued token")  # fmt: skip
        assert len(token) > 20 and vm_id in await tools.evaluate("document.getElementById('token-url').href")
        await tools.evaluate("document.getElementById('token-dialog').close()")

        await tools.evaluate(f"location.hash = '#/vm/{vm_id}'")
        await _screen_has(tools, "# ", "root's prompt in the terminal (the shell woke the VM)")
        await tools.type("echo $((6*7))")
        lines = (await _screen_has(tools, "\n42", "42 from the shell")).splitlines()
        assert "42" in [line.strip() for line in lines]
        await _full_screen_program(tools)

        await _cross_site_post_is_refused(tools, client, url)
        await tools.call("Page.navigate", url=url)  # back: the session still holds
        await _until(tools, "!!document.querySelector('#vm-table')", "the table again, signed in")
        await tools.evaluate("document.getElementById('sign-out').click()")
        await _until(tools, "!document.getElementById('sign-in').hidden", "the sign-in form after signing out")
        status = await _settle(tools, "fetch('/v1/vms').then((r) => r.status)")
        assert status == 401
