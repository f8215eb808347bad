"""VM rows as both backends store them: the same columns and encoding as vmm/registry.py."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from ..model import RamMode, VmRecord, VmState
from ..policy import Policy
from .api import PlacedVm

RECORD_FIELDS = (
    "template",
    "state",
    "policy",
    "app_port",
    "created_at",
    "last_activity",
    "state_changed_at",
    "ram_mode",
    "pid",
    "reason",
)  # what `record_values` gives, in order; a VM's id and host are not part of its record
RECORD_COLUMNS = ", ".join(RECORD_FIELDS)
VM_COLUMNS = f"id, host_id, {RECORD_COLUMNS}"
_RENAMED_STATES = {"starting": VmState.PENDING.value}  # names of earlier registry versions


def record_values(rec: VmRecord) -> tuple[Any, ...]:
    """The values of RECORD_FIELDS, in order."""
    return (
        rec.template,
        rec.state.value,
        orjson.dumps(rec.policy.to_dict()).decode(),
        rec.app_port,
        rec.created_at,
        rec.last_activity,
        rec.state_changed_at,
        rec.ram_mode.value,
        rec.pid,
        rec.reason,
    )


def placed_vm(row: Sequence[Any]) -> PlacedVm:
    """A row selected as VM_COLUMNS."""
    return PlacedVm(
        host_id=row[1],
        rec=VmRecord(
            id=row[0],
            template=row[2],
            state=VmState(_RENAMED_STATES.get(row[3], row[3])),
            policy=Policy.from_dict(orjson.loads(row[4])),
            app_port=row[5],
            created_at=row[6],
            last_activity=row[7],
            state_changed_at=row[8],
            ram_mode=RamMode(row[9]),
            pid=row[10],
            reason=row[11],
        ),
    )
