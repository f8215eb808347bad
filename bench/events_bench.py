"""The lifecycle event feed under load, and what a dead webhook costs a wake.

`python -m bench.events_bench [--changes 1000] [--clients 10] [--wakes 5]`, one process: a VM
manager with a real demo VM, the control API's GET /v1/events on 127.0.0.1, CLIENTS SSE
clients and one webhook receiver on loopback.

1. Delivery: the VM is paused and resumed until CHANGES lifecycle events were recorded; every
   client and the webhook must get every one. Latency is from the moment the event was
   recorded (a listener on the ring, same clock) to its arrival, p50 and p99.
2. A dead webhook: the median wake (restore of a suspended VM) with a webhook whose server
   accepts and never answers, against the same with no webhook; one run, their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
from aiohttp import web

from edge.control import build_control_app
from edge.metrics import Metrics
from edge.settings import token_service
from edge.webhooks import Webhooks
from mvm.config import load_config
from vmm.events import EventsSettings, Webhook
from vmm.manager import VmManager
from vmm.model import VmState
from vmm.settings import VmmSettings

from .stats import median, p99, table
from .tools import state_dir

SECRET = "bench-webhook-secret-0123"
DELIVERY_TIMEOUT = 120.0  # seconds for the last event to reach everyone after the last change


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, int(runner.addresses[0][1])


async def _client(url: str, key: str, arrivals: dict[int, float], ready: asyncio.Event) -> None:
    """An SSE client: the arrival time of each event's seq."""
    timeout = aiohttp.ClientTimeout(total=None)
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}, timeout=timeout) as http,
        http.get(url, params={"after": "0"}) as resp,
    ):
        ready.set()
        async for line in resp.content:
            if line.startswith(b"id: "):
                arrivals[int(line[4:])] = time.perf_counter()


async def _delivery(manager: VmManager, changes: int, clients: int) -> list[list[object]]:
    ring = manager.records.events
    recorded: dict[int, float] = {}
    ring.listeners.append(lambda ev: recorded.__setitem__(ev.seq, time.perf_counter()))
    hooked: dict[int, float] = {}

    async def receive(request: web.Request) -> web.Response:
        hooked[int(request.headers["X-Mvm-Event-Id"])] = time.perf_counter()
        await request.read()
        return web.Response()

    hook_app = web.Application()
    hook_app.router.add_post("/hook", receive)
    hook_runner, hook_port = await _serve(hook_app)
    settings = EventsSettings(webhooks=(Webhook(f"http://127.0.0.1:{hook_port}/hook", SECRET),))
    webhooks = Webhooks(settings, Metrics())
    ring.listeners.append(webhooks.offer)
    webhooks.start()
    cfg = load_config(None)
    control = build_control_app(cfg.server, manager, token_service(cfg.tokens), Metrics(), ring, 15.0)
    control_runner, port = await _serve(control)
    arrivals: list[dict[int, float]] = [{} for _ in range(clients)]
    readies = [asyncio.Event() for _ in range(clients)]
    url = f"http://127.0.0.1:{port}/v1/events"
    tasks = [asyncio.create_task(_client(url, cfg.server.admin_key, arrivals[i], readies[i])) for i in range(clients)]
    try:
        for ready in readies:
            await asyncio.wait_for(ready.wait(), 30)
        first = ring.last_seq + 1
        vm = await manager.create_vm()
        began = time.perf_counter()
        while ring.last_seq - first + 1 < changes:
            running = manager.get(vm.id).state is VmState.RUNNING
            await (manager.pause(vm.id) if running else manager.resume(vm.id))
        changed_for = time.perf_counter() - began
        await manager.delete(vm.id)
        wanted = set(range(first, first + changes))
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while time.monotonic() < deadline and not all(wanted <= set(a) for a in [*arrivals, hooked]):
            await asyncio.sleep(0.05)
        sse = [(a[s] - recorded[s]) * 1000 for a in arrivals for s in wanted if s in a]
        hook = [(hooked[s] - recorded[s]) * 1000 for s in wanted if s in hooked]
        got = sum(len(wanted & set(a)) for a in arrivals)
        return [
            [f"{clients} SSE clients", f"{got} / {changes * clients}", f"{median(sse):.2f}", f"{p99(sse):.2f}",
             f"{max(sse):.2f}"],
            ["1 webhook", f"{len(wanted & set(hooked))} / {changes}", f"{median(hook):.2f}", f"{p99(hook):.2f}",
             f"{max(hook):.2f}"],
            [f"(the {changes} changes took {changed_for:.1f} s: {changes / changed_for:.0f} events/s)", "", "", "", ""],
        ]  # fmt: skip
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await control_runner.cleanup()
        await webhooks.stop()
        ring.listeners.clear()
        await hook_runner.cleanup()


async def _wakes(manager: VmManager, vm_id: str, count: int) -> list[float]:
    """Milliseconds of each wake (restore) of the VM, suspended before each."""
    times = []
    for _ in range(count):
        await manager.suspend(vm_id)
        began = time.perf_counter()
        await manager.resume(vm_id)
        times.append((time.perf_counter() - began) * 1000)
    return times


async def _dead_webhook(manager: VmManager, wakes: int) -> list[list[object]]:
    """A server that accepts and never answers: every POST waits for its timeout, then retries."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1024)
    vm = await manager.create_vm()
    try:
        none = await _wakes(manager, vm.id, wakes)
        dead = Webhook(f"http://127.0.0.1:{silent.getsockname()[1]}/hook", SECRET)
        webhooks = Webhooks(EventsSettings(webhooks=(dead,), webhook_timeout=30.0), Metrics())
        manager.records.events.listeners.append(webhooks.offer)
        webhooks.start()
        try:
            with_dead = await _wakes(manager, vm.id, wakes)
            queued = len(webhooks.senders[0].queue)
        finally:
            manager.records.events.listeners.clear()
            await webhooks.stop()
        ratio = median(with_dead) / median(none)
        return [
            ["no webhook", wakes, f"{median(none):.1f}", f"{max(none):.1f}", ""],
            ["a dead webhook (accepts, never answers)", wakes, f"{median(with_dead):.1f}", f"{max(with_dead):.1f}",
             f"{ratio:.2f} ({queued} events queued behind it)"],
        ]  # fmt: skip
    finally:
        await manager.delete(vm.id)
        silent.close()


async def run(changes: int, clients: int, wakes: int) -> str:
    root = Path(tempfile.mkdtemp(prefix="mvmb-", dir="/tmp"))
    events = EventsSettings(retain_count=changes * 2)
    settings = replace(VmmSettings(state_dir=state_dir(root / "state")), events=events)
    manager = VmManager(settings)
    try:
        await manager.start()
        await manager.create_template("demo", "demo", lambda _: None)
        delivery = await _delivery(manager, changes, clients)
        dead = await _dead_webhook(manager, wakes)
        return "\n".join([
            f"accelerator: {manager.accel.name}; {changes} lifecycle changes (pause/resume of a demo VM)",
            table(["delivered to", "events", "p50 ms", "p99 ms", "max ms"], delivery),
            "",
            table(["wake (restore of a suspended demo VM)", "n", "median ms", "max ms", "dead / none"], dead),
        ])  # fmt: skip
    finally:
        for rec in list(manager.list_vms()):
            with contextlib.suppress(Exception):
                await manager.delete(rec.id)
        await manager.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--wakes", type=int, default=5)
    args = parser.parse_args()
    print(asyncio.run(run(max(10, args.changes), max(1, args.clients), max(2, args.wakes))))


if __name__ == "__main__":
    main()
