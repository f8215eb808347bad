"""CPU time of the processes under test, from /proc: what a server spends per request.

A request rate depends on who else runs on the machine; the CPU seconds a server process
used over a load run, divided by the requests it answered, depend on it less (though a server
that is busier pays less per request: more events per wake-up). The kernel's work on a
process's sockets (system time) is counted with it.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, children: bool = True) -> float:
    """User plus system CPU seconds of process `pid` (all its threads) and, with `children`, of its
    live children (nginx's workers); 0 for a process that is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        own = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14 and 15)
        tasks = Path(f"/proc/{pid}/task").iterdir() if children else ()
        kids = [int(kid) for task in tasks for kid in (task / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return own + sum(cpu_seconds(kid) for kid in kids)


def own_cpu_seconds() -> float:
    """User plus system CPU seconds of this process (an edge and manager in the bench's own process) and
    of its reaped children (ip, ss, qemu-img)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def per_request_us(cpu: float, requests: int) -> float | None:
    """Microseconds of CPU per request; None when no request was counted."""
    return cpu / requests * 1e6 if requests else None
