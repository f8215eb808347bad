"""Sizes: the product's limits for a template, and whether this host can give what is asked."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import InvalidRequest, OverCapacity

MAX_VCPUS = 16
MAX_MEMORY_MB = 32 * 1024
MAX_DISK_MB = 32 * 1024
MIN_MEMORY_MB = 64


def check_limits(memory_mb: int, vcpus: int, disk_mb: int, where: str) -> None:
    """The product's bounds for one VM, with the offending key named."""
    for key, value, low, high in (
        ("memory_mb", memory_mb, MIN_MEMORY_MB, MAX_MEMORY_MB),
        ("vcpus", vcpus, 1, MAX_VCPUS),
        ("disk_mb", disk_mb, 0, MAX_DISK_MB),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidRequest(f"{where}.{key} must be an integer in [{low}, {high}], got {value!r}")


def mem_available_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def check_fits(memory_mb: int, vcpus: int, state_dir: Path) -> None:
    """Refuse a boot this host cannot run: more vCPUs than cores, more memory than is free."""
    cores = os.cpu_count() or 1
    if vcpus > cores:
        raise OverCapacity(f"{vcpus} vCPUs asked, this host has {cores} cores")
    free = mem_available_mb()
    if memory_mb > free:
        raise OverCapacity(f"{memory_mb} MiB of memory asked, this host has {free} MiB available")
    check_free_space(state_dir, memory_mb * 1024 * 1024, "the template's RAM file")


def check_memory_for_vm(memory_mb: int, reserve_mb: int) -> None:
    """A new VM may touch all its memory: refuse it while less than that is available beyond the host's reserve."""
    free = mem_available_mb() - reserve_mb
    if memory_mb > free:
        raise OverCapacity(
            f"this host cannot take a {memory_mb} MiB VM: {max(free, 0)} MiB available beyond the "
            f"{reserve_mb} MiB it keeps for itself (vmm.memory_reserve_mb)"
        )


def check_free_space(path: Path, need_bytes: int, what: str) -> None:
    """Refuse to start writing `need_bytes` where they do not fit: a full disk kills guests."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free
    if need_bytes > free:
        raise OverCapacity(
            f"not enough disk space for {what}: {need_bytes / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free "
            f"on {path}"
        )
