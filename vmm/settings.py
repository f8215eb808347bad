"""Settings of the VM plane; mvm.config fills them from the [vmm] TOML section."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .policy import Policy


@dataclass(frozen=True)
class VmmSettings:
    """Paths and knobs of the VM manager. Every default works on one machine."""

    state_dir: Path = Path("var")
    accelerator: str = "auto"  # auto | kvm | tcg
    qemu_binary: str = "qemu-system-x86_64"
    boot_timeout: float = 90.0
    restore_timeout: float = 20.0
    on_shutdown: str = "keep"  # keep | suspend: what `mvm serve` does with running VMs when it stops
    default_template: str = "demo"
    default_image: str = "demo"
    app_log_max_bytes: int = 1 << 20  # per VM app log file; one older file of the same size is kept
    agent_timeout: float = 2.0  # longest wait for the guest agent after a restore; then the wake goes on
    guest_sync: bool = True  # clock, entropy and hostname after every launch and restore (off: tests only)
    max_lifetime_cap: float | None = 8 * 3600.0  # the longest policy.max_lifetime a VM may ask for
    terminated_ttl: float = 3600.0  # how long a terminated VM's record stays visible (`mvm vm get`)
    memory_reserve_mb: int = 512  # memory a host keeps for itself: no new VM while less than its size is left
    verify_ram: bool = False  # checksum a VM's RAM file at suspend and verify it at restore (costs a full read)
    default_policy: Policy = field(default_factory=Policy)

    @property
    def images_dir(self) -> Path:
        return self.state_dir / "images"

    @property
    def templates_dir(self) -> Path:
        return self.state_dir / "templates"

    @property
    def vms_dir(self) -> Path:
        return self.state_dir / "vms"

    @property
    def containers_dir(self) -> Path:
        """buildah's image store for Dockerfile builds (kept here, not in the host's global store)."""
        return self.state_dir / "containers"

    @property
    def cache_dir(self) -> Path:
        return self.state_dir / "cache"

    @property
    def registry_path(self) -> Path:
        return self.state_dir / "registry.sqlite3"
