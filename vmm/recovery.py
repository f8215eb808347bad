"""Recovery after the manager restarts (or crashed): each VM settled from what is really there.

A transition cut short by a crash leaves one of: a QEMU loading a snapshot (restore), a QEMU
moving RAM (first suspend), a paused QEMU whose snapshot is incomplete, or temporary files.
The snapshot is trusted only if it is complete; otherwise the VM's QEMU is kept (paused) so
nothing of its memory is lost.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from . import snapshot_check
from .errors import VmmError
from .jsonlog import log
from .lifecycle import Lifecycle
from .live import LiveVm
from .model import RamMode, VmState
from .runtime import OnLost, Runtime
from .settings import VmmSettings
from .vm_files import OVERLAY, STATE, STATE_DEV, app_log, finish_ram_move, remove_snapshot

_LIVE = (VmState.RUNNING, VmState.PAUSED)


async def recover(
    vm: LiveVm, found: list[int], settings: VmmSettings, runtime: Runtime, lifecycle: Lifecycle, on_lost: OnLost
) -> None:
    """Settle a VM after a restart: re-adopt the QEMU that runs it (`found`: its QEMUs running now),
    end every other one, tidy its files."""
    rec = vm.rec
    vm_dir = settings.vms_dir / rec.id
    tidy_snapshot_files(vm_dir, rec.ram_mode)
    snapshot_kept = (vm_dir / STATE).exists()
    runner = rec.pid if rec.pid in found else None
    keeps = rec.state in (*_LIVE, VmState.PENDING) or (rec.state is VmState.SUSPENDING and not snapshot_kept)
    keep = runner if keeps else None
    was = rec.state
    await runtime.kill_strays(rec.id, keep, found)
    run_state = await runtime.adopt(vm, keep, on_lost) if keep else None
    if run_state in ("running", "paused", "postmigrate"):
        remove_snapshot(vm_dir)  # the guest ran on (or may): a snapshot left over no longer matches
        with contextlib.suppress(VmmError):  # a suspend cut short may have cut its connections
            await runtime.uncut(rec.id)
        await runtime.open_egress(vm)
        if (vm_dir / OVERLAY).exists():
            await runtime.open_console(vm, app_log(settings, rec.id))
            await runtime.connect_agent(vm)
    if run_state == "running":
        lifecycle.record_outcome(rec, VmState.RUNNING, recovered=True)
    elif run_state in ("paused", "postmigrate"):
        why = None if was in _LIVE else f"manager restarted during {was.value}"
        lifecycle.record_outcome(rec, VmState.PAUSED, reason=why, recovered=True)
    elif rec.state in (VmState.SUSPENDED, VmState.FAILED):
        pass
    else:
        await runtime.stop(vm)
        if was in (VmState.RESTORING, VmState.SUSPENDING) and snapshot_kept:
            reason = f"manager restarted during {was.value}"
            lifecycle.record_outcome(rec, VmState.SUSPENDED, reason=reason, recovered=True)
        else:
            reason = f"QEMU was gone when the manager restarted ({was.value})"
            lifecycle.record_outcome(rec, VmState.FAILED, reason=reason, recovered=True)
    if rec.state is VmState.SUSPENDED and runtime.network_exists(rec.id):
        # A suspended VM holds no namespace (one left by a crash mid-suspend, or an older manager):
        # its restore makes a fresh one.
        with contextlib.suppress(VmmError, OSError):
            await runtime.delete_network(rec.id)
        runtime.release_group(rec.id)
    log.event("vm.recovered", vm=rec.id, state=rec.state.value, adopted=run_state is not None, was=was.value)


def tidy_snapshot_files(vm_dir: Path, ram_mode: RamMode) -> None:
    """Temporary files of a transition cut short: finished if the registry says it got that far, else removed.

    Every snapshot writer (qmp.save, snapshot_check.write) writes `*.tmp` first and renames it.
    """
    for tmp in vm_dir.glob("*.tmp"):
        tmp.unlink(missing_ok=True)
    if (vm_dir / STATE_DEV).exists():
        if ram_mode is RamMode.OWN_FILE and snapshot_check.sidecar(vm_dir / STATE_DEV).exists():
            finish_ram_move(vm_dir)
        else:
            (vm_dir / STATE_DEV).unlink()
            snapshot_check.remove(vm_dir / STATE_DEV)
