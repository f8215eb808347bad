"""Ending the background tasks a part started: cancelled, then awaited, so none outlives its owner."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


async def cancelled(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel each task (None: never started), then wait for each to end."""
    started = [task for task in tasks if task is not None]
    for task in started:
        task.cancel()
    for task in started:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def to_its_end(step: Awaitable[T]) -> T:
    """`step`'s result. Cancelled meanwhile, the step is not: it runs to its end first, then the
    cancellation goes on, so what it was making (a namespace, a cgroup) exists for the undo to find."""
    running = asyncio.ensure_future(step)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        await running
        raise
