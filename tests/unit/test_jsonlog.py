import io
import logging

import orjson

from vmm import jsonlog


def test_events_and_library_logs_are_one_json_object_per_line() -> None:
    out = io.StringIO()
    jsonlog.configure("info", out)
    try:
        jsonlog.log.event("vm.suspended", vm="vabcdefghijk", ms=12.5)
        jsonlog.log.event("noise", level="debug")
        logging.getLogger("qemu.qmp").warning("lost %s", "connection")
    finally:
        jsonlog.configure("info", None)
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["event"], e["level"]) for e in lines] == [("vm.suspended", "info"), ("library", "warning")]
    assert lines[0]["vm"] == "vabcdefghijk" and lines[1]["msg"] == "lost connection"
