"""Choosing the catalog backend from the `[catalog] url` setting."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from vmm.errors import CatalogError

from .api import Catalog
from .postgres import open_postgres, redact
from .sqlite import open_sqlite

POSTGRES_SCHEMES = ("postgresql", "postgres")


async def open_catalog(url: str | None, sqlite_path: Path) -> Catalog:
    """PostgreSQL for a postgresql:// URL (shared by many hosts), else the embedded SQLite file.

    Raises CatalogError, whose message names `catalog.url`, for a URL of another kind or a
    server that cannot be reached.
    """
    if not url:
        return await open_sqlite(sqlite_path)
    try:
        scheme = urlsplit(url).scheme
    except ValueError as exc:
        raise CatalogError(f"catalog.url: not a valid URL: {exc}") from None
    if scheme not in POSTGRES_SCHEMES:
        raise CatalogError(
            f"catalog.url: unsupported URL {redact(url)!r}: use postgresql://user@host/database,"
            " or leave catalog.url unset for the embedded SQLite catalog"
        )
    return await open_postgres(url)
