"""Pages of a VM list (`GET /v1/vms?limit=&cursor=`): a stable order and a cursor that survives deletes.

The order is (created_at, id), the same on a host and in the catalog. The cursor names the last
VM of a page by that key, not by position, so a VM created or deleted between two pages never
makes another one appear twice or go missing.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from vmm.errors import InvalidRequest
from vmm.model import VmRecord

MAX_PAGE = 1000  # the largest `limit` one request may ask for


@dataclass(frozen=True)
class PageRequest:
    limit: int
    after: tuple[float, str] | None  # the (created_at, id) of the last VM of the page before


def page_request(query: Mapping[str, str], default_limit: int) -> PageRequest:
    """`limit` and `cursor` of a list request; InvalidRequest (422) names the one that is wrong."""
    text = query.get("limit")
    limit = default_limit
    if text is not None:
        if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE:
            raise InvalidRequest(f"limit={text!r}: must be a whole number from 1 to {MAX_PAGE}")
        limit = int(text)
    cursor = query.get("cursor")
    return PageRequest(limit, None if cursor in (None, "") else _parse_cursor(cursor))


def page(records: Iterable[VmRecord], request: PageRequest) -> tuple[list[VmRecord], str | None]:
    """The VMs of one page, and the cursor of the next (None: this is the last page)."""
    ordered = sorted(records, key=_key)
    start = 0 if request.after is None else bisect_right(ordered, request.after, key=_key)
    chunk = ordered[start : start + request.limit]
    more = start + request.limit < len(ordered)
    return chunk, cursor_of(chunk[-1]) if more and chunk else None


def cursor_of(rec: VmRecord) -> str:
    return f"{rec.created_at!r}_{rec.id}"


def _key(rec: VmRecord) -> tuple[float, str]:
    return rec.created_at, rec.id


def _parse_cursor(cursor: str) -> tuple[float, str]:
    at, _, vm_id = cursor.partition("_")
    try:
        return float(at), vm_id
    except ValueError:
        raise InvalidRequest(f"cursor={cursor!r}: not a cursor this API gave (the `next` of a page)") from None
