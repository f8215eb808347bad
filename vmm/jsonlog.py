"""Structured logs: one JSON object per line (orjson), always with an event name."""

from __future__ import annotations

import sys
import time
from typing import IO, Any

import orjson

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class JsonLog:
    """Writes events as single JSON lines; `vm` is a field like any other."""

    def __init__(self, stream: IO[str] | None = None, level: str = "info") -> None:
        self.stream = stream
        self.threshold = _LEVELS[level]

    def event(self, event: str, level: str = "info", **fields: Any) -> None:
        if _LEVELS[level] < self.threshold:
            return
        record = {"ts": round(time.time(), 3), "level": level, "event": event, **fields}
        stream = self.stream or sys.stderr
        stream.write(orjson.dumps(record, default=str).decode() + "\n")
        stream.flush()


log = JsonLog()


def configure(level: str = "info", stream: IO[str] | None = None) -> None:
    """Set the process-wide log level (and stream, for tests)."""
    log.threshold = _LEVELS[level]
    log.stream = stream
