"""Where a new VM goes: hosts that are up and have its template, the most free memory first."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fleet.catalog import HostRecord


def candidates(
    hosts: Iterable[HostRecord], having_template: set[str], up: Callable[[str], bool], wanted: str | None = None
) -> list[HostRecord]:
    """The hosts to try, in order; `wanted` narrows them to one host (an operator's choice)."""
    usable = [h for h in hosts if up(h.id) and h.id in having_template and (wanted is None or h.id == wanted)]
    return sorted(usable, key=lambda h: (-h.capacity.memory_mb, h.id))
