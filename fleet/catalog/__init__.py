"""The catalog VM hosts and edge workers share: PostgreSQL when `catalog.url` is set, else SQLite."""

from .api import Capacity, Catalog, ChangeCallback, GapCallback, HostRecord, PlacedVm, Unsubscribe
from .factory import open_catalog

__all__ = [
    "Capacity",
    "Catalog",
    "ChangeCallback",
    "GapCallback",
    "HostRecord",
    "PlacedVm",
    "Unsubscribe",
    "open_catalog",
]
