"""The files of one VM's directory, and the steps that keep its snapshot files consistent.

Shared by the snapshot code (which writes them) and recovery (which finishes or removes what a
transition cut short left behind).
"""

from __future__ import annotations

from pathlib import Path

from . import snapshot_check
from .applog import AppLog
from .qemu import APP_LOG, SERIAL_LOG
from .settings import VmmSettings

GUEST_TOOL = "/mvm/init"  # in the guest: its file and hook tool (guest/init)
OVERLAY = "disk.qcow2"  # the VM's own writes, over its template's read-only base disk
AGENT_KEY = "agent.key"  # the VM's key for its guest agent (0600)
STATE = "state"  # the VM's snapshot: device state (and all RAM, until its first suspend's RAM move ends)
STATE_DEV = "state.dev"  # device state saved by the RAM move, renamed over STATE once the registry knows
RAM = "ram"  # the VM's own RAM file, shared with its QEMU
CHECKPOINTS = "checkpoints"  # the VM's checkpoints, one directory each (vmm.checkpoints)


def remove_snapshot(vm_dir: Path) -> None:
    """The snapshot and its checksum, once the guest has run on past it."""
    (vm_dir / STATE).unlink(missing_ok=True)
    snapshot_check.remove(vm_dir / STATE)


def finish_ram_move(vm_dir: Path) -> None:
    """The device state saved by the RAM move replaces the full stream (checksum first)."""
    snapshot_check.sidecar(vm_dir / STATE_DEV).rename(snapshot_check.sidecar(vm_dir / STATE))
    (vm_dir / STATE_DEV).rename(vm_dir / STATE)


def app_log(settings: VmmSettings, vm_id: str) -> AppLog:
    """The VM's app output: app.log for disk images, the console for the initramfs demo."""
    vm_dir = settings.vms_dir / vm_id
    name = APP_LOG if (vm_dir / OVERLAY).exists() else SERIAL_LOG
    return AppLog(vm_dir / name, settings.app_log_max_bytes)
