"""Structured logs: one JSON object per line (orjson), always with an event name."""

from __future__ import annotations

import logging
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


class _StdlibBridge(logging.Handler):
    """Library loggers (qemu.qmp, asyncio, aiohttp) write through the same JSON lines."""

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname.lower() if record.levelname.lower() in _LEVELS else "error"
        fields: dict[str, Any] = {"logger": record.name, "msg": record.getMessage()}
        if record.exc_info and record.exc_info[1] is not None:
            fields["error"] = repr(record.exc_info[1])
        log.event("library", level=level, **fields)


def configure(level: str = "info", stream: IO[str] | None = None) -> None:
    """Set the process-wide log level (and stream, for tests); route library logs here too."""
    log.threshold = _LEVELS[level]
    log.stream = stream
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StdlibBridge)]:
        root.removeHandler(handler)
    root.addHandler(_StdlibBridge())
    root.setLevel(logging.WARNING)
