"""`mvm vm top`: a table of what the running VMs use, read through the SDK's metrics()."""

from __future__ import annotations

import asyncio

from microvm_edge import AsyncClient, VmMetrics
from microvm_edge.errors import NotFound

SHOWN = ("running", "paused")  # VMs with a QEMU: the others use no CPU or memory
HEADER = f"{'ID':<14}{'STATE':<9}{'CPU%':>7}{'MEM':>11}{'PEAK':>11}{'DISK':>11}{'NET RX':>11}{'NET TX':>11}"


async def sample(client: AsyncClient) -> list[VmMetrics]:
    """The metrics of every running (or paused) VM; one deleted meanwhile is left out."""

    async def one(vm_id: str) -> VmMetrics | None:
        try:
            return await client.metrics(vm_id)
        except NotFound:
            return None

    vms = [vm.id for vm in await client.list() if vm.state in SHOWN]
    found = await asyncio.gather(*(one(vm_id) for vm_id in vms))
    return sorted((m for m in found if m is not None), key=lambda m: (-m.cpu_percent, m.vm))


def table(rows: list[VmMetrics]) -> str:
    """The table's text, busiest VM first (net rx: what the guest sent, as its tap counts it)."""
    lines = [HEADER]
    for m in rows:
        lines.append(
            f"{m.vm:<14}{m.state:<9}{m.cpu_percent:>7.1f}{size(m.memory_bytes):>11}{size(m.memory_peak_bytes):>11}"
            f"{size(m.disk_bytes):>11}{size(m.net_rx_bytes):>11}{size(m.net_tx_bytes):>11}"
        )
    if not rows:
        lines.append("(no running VMs)")
    return "\n".join(lines)


def size(n: int) -> str:
    """Bytes for a person: 512B, 3.0KiB, 140.2MiB, 1.5GiB."""
    if n < 1024:
        return f"{n}B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GiB"
