"""The records the VM plane keeps: what a VM and a template are, and their states."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .hooks import Hooks
from .policy import Policy


class VmState(enum.StrEnum):
    """Lifecycle states, named as the anchor (Lambda MicroVMs) names them, plus paused and restoring.

    Transitional states (pending, suspending, restoring, terminating) only exist while a
    transition runs. A terminated VM is kept as a record for a while, so `mvm vm get` can
    still say what happened to it.
    """

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    SUSPENDING = "suspending"
    SUSPENDED = "suspended"
    RESTORING = "restoring"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    FAILED = "failed"


# States in which the VM's QEMU is going or gone: a connection to its guest would only hang.
GUEST_GOING_AWAY = frozenset(
    (VmState.SUSPENDING, VmState.SUSPENDED, VmState.FAILED, VmState.TERMINATING, VmState.TERMINATED)
)


class RamMode(enum.StrEnum):
    """Where a VM's guest RAM lives, which decides how it is snapshotted.

    TEMPLATE_COW: the template's RAM file mapped private (copy-on-write); a suspend must
    stream all RAM. OWN_FILE: the VM's own shared RAM file; a suspend writes device state only.
    """

    TEMPLATE_COW = "template-cow"
    OWN_FILE = "own-file"


@dataclass
class Template:
    """A pre-initialised snapshot of an image: every VM starts from one."""

    name: str
    image: str
    memory_mb: int
    vcpus: int
    app_port: int
    ports: tuple[int, ...]
    created_at: float
    path: str
    cmdline: str
    accelerator: str
    disk_mb: int = 0  # 0: no root disk (an initramfs image)
    hooks: Hooks | None = None
    h2c_ports: tuple[int, ...] = ()  # ports the edge reaches with prior-knowledge HTTP/2 (vmm.port_protocols)
    cpu: str = ""  # QEMU's -cpu the snapshot was made on: every clone starts on it (vmm.accel)

    @property
    def base_disk(self) -> Path | None:
        """The read-only root disk every VM's copy-on-write overlay is backed by."""
        return Path(self.path) / "disk.base" if self.disk_mb else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image": self.image,
            "memory_mb": self.memory_mb,
            "vcpus": self.vcpus,
            "disk_mb": self.disk_mb,
            "app_port": self.app_port,
            "ports": list(self.ports),
            "h2c_ports": list(self.h2c_ports),
            "created_at": self.created_at,
        }


@dataclass
class VmRecord:
    """One VM as the registry stores it and the edge sees it."""

    id: str
    template: str
    state: VmState
    policy: Policy
    app_port: int
    created_at: float
    last_activity: float
    ram_mode: RamMode = RamMode.TEMPLATE_COW
    pid: int | None = None
    reason: str | None = None
    state_changed_at: float = 0.0
    # Bumped at every suspend and every restore: connections to the guest opened in an earlier
    # generation reached a QEMU that no longer runs, so edges never reuse them.
    generation: int = 0
    # From the template, not stored in the registry: set at create and when the manager starts.
    h2c_ports: tuple[int, ...] = ()

    def allows_port(self, port: int) -> bool:
        """The app port is always reachable; other ports only through the policy allow-list."""
        return port == self.app_port or port in self.policy.ports

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "template": self.template,
            "state": self.state.value,
            "policy": self.policy.to_dict(),
            "app_port": self.app_port,
            "created_at": self.created_at,
            "last_activity": self.last_activity,
            "state_changed_at": self.state_changed_at,
            "reason": self.reason,
            "pid": self.pid,
            "generation": self.generation,
        }
