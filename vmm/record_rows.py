"""A VM record as table columns: the registry (vmm/registry.py) and the fleet's catalog store it alike,
so an embedded registry file can become a catalog."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from .model import RamMode, VmRecord, VmState
from .policy import Policy

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
    "generation",
)  # what `record_values` gives, in order; a VM's id and host are not part of its record
RECORD_COLUMNS = ", ".join(RECORD_FIELDS)
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
        rec.generation,
    )


def record_from(vm_id: str, values: Sequence[Any]) -> VmRecord:
    """A VM's record from the values of RECORD_FIELDS, in order (the registry's rows too)."""
    return VmRecord(
        id=vm_id,
        template=values[0],
        state=VmState(_RENAMED_STATES.get(values[1], values[1])),
        policy=Policy.from_dict(orjson.loads(values[2])),
        app_port=values[3],
        created_at=values[4],
        last_activity=values[5],
        state_changed_at=values[6],
        ram_mode=RamMode(values[7]),
        pid=values[8],
        reason=values[9],
        generation=values[10],
    )
