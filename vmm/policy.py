"""Per-VM policy as data: idle timers, lifetime, size and reachable ports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .capacity import MAX_DISK_MB, MAX_MEMORY_MB, MAX_VCPUS, MIN_MEMORY_MB
from .errors import InvalidRequest
from .network.egress import EgressPolicy

HOUR = 3600.0
DAY = 24 * HOUR


@dataclass(frozen=True)
class Policy:
    """What the reaper and the edge enforce for one VM.

    Times are seconds; None disables that step. A VM suspended for `suspended_ttl` is
    terminated and its files removed. With `auto_resume` false a request to a paused or
    suspended VM gets 503 instead of waking it, until it is resumed explicitly. Memory,
    vCPUs and the disk size are fixed by the template's snapshot, so they act as limits the
    template must fit in; by default a VM may be as large as the product allows (see
    vmm.capacity).
    """

    idle_pause_after: float | None = None
    idle_suspend_after: float | None = 300.0
    max_lifetime: float | None = 8 * HOUR
    suspended_ttl: float | None = 7 * DAY
    auto_resume: bool = True
    egress: EgressPolicy = field(default_factory=EgressPolicy)  # "none", or host:port patterns
    memory_mb: int = MAX_MEMORY_MB
    vcpus: int = MAX_VCPUS
    disk_mb: int = MAX_DISK_MB
    ports: tuple[int, ...] = field(default_factory=tuple)
    cpu_share: float = 1.0  # the part of its vCPUs a VM may use of the host's CPUs (its cgroup's quota)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ports"] = list(self.ports)
        data["egress"] = self.egress.to_json()
        return data

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        base: Policy | None = None,
        where: str = "policy",
        max_lifetime_cap: float | None = None,
    ) -> Policy:
        """Validate `data` over `base`; errors name the offending key (e.g. policy.vcpus).

        `max_lifetime_cap` (vmm.max_lifetime_cap) bounds max_lifetime; null is then refused.
        """
        if not isinstance(data, dict):
            raise InvalidRequest(f"{where} must be an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequest(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
        merged = (base or cls()).to_dict()
        merged.update(data)
        for name in ("idle_pause_after", "idle_suspend_after", "max_lifetime", "suspended_ttl"):
            merged[name] = _seconds(merged[name], f"{where}.{name}")
        lifetime = merged["max_lifetime"]
        if max_lifetime_cap is not None and (lifetime is None or lifetime > max_lifetime_cap):
            raise InvalidRequest(
                f"{where}.max_lifetime must be at most {max_lifetime_cap:g} s (vmm.max_lifetime_cap), got {lifetime!r}"
            )
        merged["egress"] = EgressPolicy.from_json(merged["egress"], f"{where}.egress")
        if not isinstance(merged["auto_resume"], bool):
            raise InvalidRequest(f"{where}.auto_resume must be true or false, got {merged['auto_resume']!r}")
        merged["memory_mb"] = _int_in(merged["memory_mb"], f"{where}.memory_mb", MIN_MEMORY_MB, MAX_MEMORY_MB)
        merged["vcpus"] = _int_in(merged["vcpus"], f"{where}.vcpus", 1, MAX_VCPUS)
        share = merged["cpu_share"]
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0.01 <= share <= 1:
            raise InvalidRequest(f"{where}.cpu_share must be a number in [0.01, 1], got {share!r}")
        merged["cpu_share"] = float(share)
        merged["disk_mb"] = _int_in(merged["disk_mb"], f"{where}.disk_mb", 0, MAX_DISK_MB)
        ports = merged["ports"]
        if not isinstance(ports, list | tuple):
            raise InvalidRequest(f"{where}.ports must be a list of TCP ports")
        merged["ports"] = tuple(sorted({_int_in(p, f"{where}.ports[]", 1, 65535) for p in ports}))
        pause, suspend = merged["idle_pause_after"], merged["idle_suspend_after"]
        if pause is not None and suspend is not None and suspend < pause:
            raise InvalidRequest(f"{where}.idle_suspend_after ({suspend}) must not be below idle_pause_after ({pause})")
        return cls(**merged)


def _seconds(value: Any, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise InvalidRequest(f"{key} must be a positive number of seconds or null, got {value!r}")
    return float(value)


def _int_in(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{key} must be an integer in [{low}, {high}], got {value!r}")
    return value
