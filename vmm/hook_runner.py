"""Runs an image's lifecycle hooks (run, suspend, resume, terminate, fork) for one VM.

A hook is an HTTP call to the app (vmm.hooks.call_http) or /etc/mvm/hooks/<event>.d run
through the guest agent. A hook never stops a transition: failures and timeouts are logged.
"""

from __future__ import annotations

import asyncio
import time

from .hooks import HookOutcome, Hooks, call_http
from .jsonlog import log
from .live import LiveVm
from .model import Template
from .vm_files import GUEST_TOOL

OUTPUT_KEPT = 4096  # bytes of an exec hook's output kept for the log


async def run_hook(
    vm: LiveVm, tpl: Template, event: str, payload: bytes = b"{}", env: tuple[str, ...] = ()
) -> None:
    """The image's hook for `event`, if it has one (`env`: NAME=value for its executables). Failures and
    timeouts are logged, never raised."""
    try:
        hooks = tpl.hooks
        if hooks is None or not hooks.has(event):
            return
        started = time.monotonic()
        outcomes = []
        if event in hooks.http:
            outcomes.append(await call_http(vm.rec.id, hooks, event, payload))
        if event in hooks.exec:
            outcomes.append(await _exec_hook(vm, hooks, event, env))
    except Exception as exc:
        log.event("vm.hook", level="warning", vm=vm.rec.id, hook=event, ok=False, error=repr(exc))
        return
    ok = all(o.ok for o in outcomes)
    ms = round((time.monotonic() - started) * 1000, 1)
    output = " | ".join(o.detail for o in outcomes)
    log.event("vm.hook", level="info" if ok else "warning", vm=vm.rec.id, hook=event, ok=ok, ms=ms, output=output)


async def _exec_hook(vm: LiveVm, hooks: Hooks, event: str, env: tuple[str, ...]) -> HookOutcome:
    """/etc/mvm/hooks/<event>.d through the agent, killed at the hook's timeout."""
    if vm.agent is None:
        return HookOutcome(False, "no guest agent to run /etc/mvm/hooks")
    output, code, ex = bytearray(), None, None
    try:
        async with asyncio.timeout(hooks.timeout(event)):  # the start too: a guest may stop reading its port
            ex = await vm.agent.exec([GUEST_TOOL, "hooks", event], list(env), "/", 0, 0)
            async for item in ex:
                if item.kind == "exit":
                    code = item.code
                elif item.kind == "error":
                    return HookOutcome(False, item.data.decode(errors="replace"))
                elif len(output) < OUTPUT_KEPT:
                    output += item.data
    except TimeoutError:
        text = output.decode(errors="replace").strip()
        return HookOutcome(False, f"/etc/mvm/hooks/{event}.d ran past {hooks.timeout(event):g} s: {text}")
    finally:
        if ex is not None and not ex.finished:
            await ex.abandon()
    text = output.decode(errors="replace").strip()
    return HookOutcome(code == 0, f"/etc/mvm/hooks/{event}.d exited {code}: {text}")
