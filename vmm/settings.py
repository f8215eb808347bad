"""Settings of the VM plane; mvm.config fills them from the [vmm] TOML section."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .events import EventsSettings
from .policy import Policy


@dataclass(frozen=True)
class JailSettings:
    """How every QEMU is confined (vmm/jail.py) and held to its share of the host (vmm/cgroups.py).

    The [jail] TOML table. Each VM's QEMU runs as a uid/gid of its own from
    [uid_start, uid_start + uid_count), leased in `lease_dir` (host-wide, so managers of
    other state directories never hand out the same uid), in a mount namespace whose root
    is a tmpfs over `root_dir` holding only that VM's files.
    """

    enabled: bool = True
    uid_start: int = 400_000  # above the usual /etc/subuid ranges (100000-165535 per user)
    uid_count: int = 10_000
    lease_dir: Path = Path("/run/microvm-edge/uids")
    root_dir: Path = Path("/run/microvm-edge/jail")  # an empty mount point; each QEMU's root is a tmpfs over it
    limits: bool = True  # per-VM cgroups: CPU quota, memory, pids, I/O weight
    cgroup_name: str = "microvm-edge"  # the tree under each controller: <name>/host and <name>/vms/<vm>
    memory_overhead_mb: int = 160  # QEMU's own memory above guest RAM (TCG's code buffer included), measured
    pids_max: int = 128  # tasks per QEMU (its vCPU, I/O and RCU threads)
    io_weight: int = 100  # each VM's I/O weight (1-10000, v2 io.weight; v1 blkio.weight where the host has it)
    host_cpu_weight: int = 1000  # the host and edge processes' CPU weight (v2 cpu.weight; a VM has 100)
    busy_cpu_weight: int = 10  # the CPU weight of a VM busy for busy_after seconds (vmm/cpu_fairness.py); 0: off
    busy_share: float = 0.8  # a VM wanting this part of its CPU quota or more (run + run-queue wait) is busy
    busy_after: float = 3.0  # seconds busy without a break before its weight drops to busy_cpu_weight


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
    clone_ram: str = "cow"  # cow | reflink: how a new VM gets its RAM from its template (vmm.reflink)
    max_concurrent_restores: int = 0  # restores at once, the rest queue in order (vmm.restore_gate); 0: one per core
    verify_ram: bool = False  # checksum a VM's RAM file at suspend and verify it at restore (costs a full read)
    max_checkpoints: int = 16  # checkpoints one VM may keep (vmm.checkpoints)
    checkpoint_max_mb: int = 8192  # the largest checkpoint (RAM + device state + disk layer) a capture may write
    max_chain_depth: int = 4  # qcow2 layers under a VM's overlay before it is flattened in the background
    default_policy: Policy = field(default_factory=Policy)
    jail: JailSettings = field(default_factory=JailSettings)
    events: EventsSettings = field(default_factory=EventsSettings)  # the [events] table

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
