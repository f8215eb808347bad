"""Ending the background tasks a part started: cancelled, then awaited, so none outlives its owner."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


async def cancelled(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel each task (None: never started), then wait for each to end."""
    started = [task for task in tasks if task is not None]
    for task in started:
        task.cancel()
    for task in started:
        with contextlib.suppress(asyncio.CancelledError):
            await task
