"""A VM manager in a process of its own, for crash tests: `python -m tests.e2e.manager_proc STATE_DIR ACTION VM_ID`.

With MVM_FAULTS="<point>=kill" in its environment it dies by SIGKILL at that point, as
the edge would if it were killed there; the test then starts a new manager on the same
state directory and checks what it recovered.
"""

from __future__ import annotations

import sys
from pathlib import Path

import uvloop

from vmm.manager import VmManager
from vmm.settings import VmmSettings


async def _run(state_dir: Path, action: str, vm_id: str) -> None:
    manager = VmManager(VmmSettings(state_dir=state_dir))
    await manager.start()
    try:
        if action == "suspend":
            await manager.suspend(vm_id)
        elif action == "wake":
            await manager.ensure_running(vm_id)
        else:
            raise SystemExit(f"unknown action {action!r}")
    finally:
        await manager.close()


if __name__ == "__main__":
    uvloop.run(_run(Path(sys.argv[1]), sys.argv[2], sys.argv[3]))
