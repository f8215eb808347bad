"""Fork, checkpoint and rewind of a python-sandbox VM holding about 200 MB of Python objects (issue 14).

One run: the parent's pause during a checkpoint and during a fork, fork -> first answer of the first
child and of all N, rewind -> first answer, PSS per child while the children only read, disk per
checkpoint. The parent is suspended once first, so it has a RAM file its children map copy-on-write.
The checkpoint pause is taken `--repeat` times (median, and each); `phases` gives the median milliseconds
of each step of a checkpoint's pause, of the fork's, and of a child's start (wall, and the manager's CPU),
from the vm.checkpointed and vm.forked log events; `load` is the host's load average before and after.

    python -m bench.fork_bench [--children 8] [--mb 200] [--repeat 3] [--dir /tmp/fork-bench]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import uvloop

from bench.proc_cpu import cpu_seconds
from bench.stats import median
from bench.tools import state_dir
from tests.e2e.guest import sandbox_run
from vmm import jsonlog
from vmm.manager import VmManager
from vmm.settings import VmmSettings
from vmm.template import create

GOALS = {"pause_ms": 300, "first_child_ms": 500, "all_children_ms": 3000}


def pss_bytes(pid: int) -> int:
    """The process's proportional set size: shared pages counted once across those that map them."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


class EventLog(io.StringIO):
    """The manager's log lines, kept to read the phases of its events from."""

    def events(self, name: str) -> list[dict[str, Any]]:
        found = (orjson.loads(line) for line in self.getvalue().splitlines() if line.startswith("{"))
        return [e for e in found if e.get("event") == name]


def phase_medians(events: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per kind (wall_ms, manager_cpu_ms) and step: the median over `events`' phases."""
    steps: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for event in events:
        for kind, values in event.get("phases", {}).items():
            for step, ms in values.items():
                steps[kind][step].append(ms)
    return {kind: {step: round(median(v), 1) for step, v in by.items()} for kind, by in steps.items()}


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


async def first_answer(vm_id: str) -> float:
    started = time.monotonic()
    assert await sandbox_run(vm_id, "len(blob)") > 0
    return (time.monotonic() - started) * 1000


async def run(root: Path, children: int, mb: int, repeat: int) -> dict[str, object]:
    settings = VmmSettings(state_dir=state_dir(root / "state"), boot_timeout=600.0)  # a busy host boots slowly
    events = EventLog()
    jsonlog.configure("info", events)
    mgr = VmManager(settings)
    await mgr.start()
    out: dict[str, object] = {"load_before": load_average()}
    try:
        await create(settings, "sandbox", "python-sandbox", mgr.accel, lambda _: None)
        parent = (await mgr.create_vm("sandbox")).id
        await sandbox_run(parent, f"blob = [bytes([i % 251]) * 1000 for i in range({mb} * 1000)]; 0", timeout=300)
        await mgr.suspend(parent)
        await mgr.resume(parent)
        pauses = []
        for n in range(repeat):
            pauses.append((await mgr.create_checkpoint(parent, f"pause-{n}")).paused_ms)
            await mgr.delete_checkpoint(parent, f"pause-{n}")
        ckpt = await mgr.create_checkpoint(parent, "base")
        pauses.append(ckpt.paused_ms)
        out["checkpoint_pause_ms"] = {"median": median(pauses), "each": pauses}
        out["checkpoint_mb"] = round(ckpt.size_bytes() / 2**20, 1)
        started = time.monotonic()
        one = (await mgr.fork(parent, 1))[0].id
        forked_ms = (time.monotonic() - started) * 1000
        answer_ms = await first_answer(one)
        out["fork_to_first_child_answer_ms"] = round((time.monotonic() - started) * 1000, 1)
        out["first_child"] = {"fork_call_ms": round(forked_ms, 1), "first_answer_ms": round(answer_ms, 1)}
        await mgr.delete(one)
        started = time.monotonic()
        kids = [r.id for r in await mgr.fork(parent, children, checkpoint="base")]
        await asyncio.gather(*(first_answer(k) for k in kids))
        out[f"fork_to_all_{children}_children_answer_ms"] = round((time.monotonic() - started) * 1000, 1)
        fork_ckpt = next(c for c in mgr.list_checkpoints(parent) if c.name.startswith("fork-"))
        out["fork_pause_ms"] = fork_ckpt.paused_ms
        pids = [mgr.get(k).pid for k in kids]
        out["child_qemu_cpu_ms_to_first_answer"] = median([cpu_seconds(p, children=False) * 1000 for p in pids if p])
        out["pss_mb_per_child"] = round(sum(pss_bytes(p) for p in pids if p) / len(kids) / 2**20, 1)
        out["child_ram_mb"] = 512
        for k in reversed(kids):
            await mgr.delete(k)
        await mgr.delete_checkpoint(parent, fork_ckpt.name)
        await sandbox_run(parent, "blob = None; 0")
        started = time.monotonic()
        await mgr.rewind(parent, "base")
        out["rewind_to_first_answer_ms"] = round((time.monotonic() - started) * 1000 + await first_answer(parent), 1)
        captures = events.events("vm.checkpointed")
        out["phases"] = {
            "checkpoint_pause": phase_medians([e for e in captures if not e["checkpoint"].startswith("fork-")]),
            "fork_pause": phase_medians([e for e in captures if e["checkpoint"].startswith("fork-")]),
            "child_start": phase_medians(events.events("vm.forked")),
        }
        out["load_after"] = load_average()
    finally:
        for rec in reversed(mgr.list_vms()):
            await mgr.delete(rec.id)
        await mgr.close()
        jsonlog.configure("info")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=8)
    parser.add_argument("--mb", type=int, default=200, help="MB of Python objects the parent holds")
    parser.add_argument("--repeat", type=int, default=3, help="checkpoints taken to measure the pause")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="forkb-", dir="/tmp"))
    try:
        result = uvloop.run(run(root, args.children, args.mb, args.repeat))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(orjson.dumps({"goals": GOALS, **result}, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
