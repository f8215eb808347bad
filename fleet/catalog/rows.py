"""VM rows as both catalog backends store them: a record's columns (vmm.record_rows), its host, and
what edges need of it that a host's own registry does not keep (its h2c ports, from its template)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vmm.model import VmRecord
from vmm.record_rows import RECORD_FIELDS, record_from, record_values

from .api import PlacedVm

VM_FIELDS = (*RECORD_FIELDS, "h2c_ports")  # what `vm_values` gives, in order
VM_COLUMNS = f"id, host_id, {', '.join(VM_FIELDS)}"


def vm_values(rec: VmRecord) -> tuple[Any, ...]:
    """The values of VM_FIELDS, in order (h2c ports as text: "50051,50052", "" for none)."""
    return (*record_values(rec), ",".join(str(port) for port in rec.h2c_ports))


def placed_vm(row: Sequence[Any]) -> PlacedVm:
    """A row selected as VM_COLUMNS."""
    rec = record_from(row[0], row[2:-1])
    rec.h2c_ports = tuple(int(port) for port in row[-1].split(",") if port)
    return PlacedVm(host_id=row[1], rec=rec)
