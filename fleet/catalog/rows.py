"""VM rows as both catalog backends store them: a record's columns (vmm.record_rows) plus its host."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vmm.record_rows import RECORD_COLUMNS, record_from

from .api import PlacedVm

VM_COLUMNS = f"id, host_id, {RECORD_COLUMNS}"


def placed_vm(row: Sequence[Any]) -> PlacedVm:
    """A row selected as VM_COLUMNS."""
    return PlacedVm(host_id=row[1], rec=record_from(row[0], row[2:]))
