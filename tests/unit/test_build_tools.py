"""Build tools run in a process group of their own, stopped with SIGTERM, then SIGKILL, past their timeout."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from vmm import buildtools
from vmm.errors import VmmError


def _gone(pid: int) -> bool:
    """True once `pid` no longer runs (a zombie waiting for init counts as gone)."""
    for _ in range(100):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def _script(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "tool.sh"
    script.write_text(f"#!/bin/bash\n{body}\n")
    script.chmod(0o755)
    return [str(script)]


def test_a_tool_ignoring_sigterm_is_killed_with_its_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buildtools, "TERM_GRACE", 0.5)
    pids = tmp_path / "pids"
    argv = _script(tmp_path, f"trap '' TERM; sleep 300 & echo $$ $! > {pids}; echo started; wait")
    lines: list[str] = []
    started = time.monotonic()
    with pytest.raises(VmmError, match=r"the tool timed out after 1 s"):
        buildtools.run_lines(argv, "the tool", lines.append, timeout=1.0)
    assert time.monotonic() - started < 5
    assert lines == ["started"]
    assert all(_gone(int(pid)) for pid in pids.read_text().split())


def test_sigterm_comes_first(tmp_path: Path) -> None:
    marker = tmp_path / "got-term"
    argv = _script(tmp_path, f"trap 'echo term > {marker}; exit 0' TERM; sleep 300 & wait")
    with pytest.raises(VmmError, match="timed out"):
        buildtools.run(argv, "the tool", timeout=0.5)
    assert marker.read_text() == "term\n"


def test_run_kills_the_group_of_a_silent_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buildtools, "TERM_GRACE", 0.3)
    pids = tmp_path / "pids"
    argv = _script(tmp_path, f"trap '' TERM; sleep 300 & echo $! > {pids}; wait")
    with pytest.raises(VmmError, match="timed out after 0 s"):
        buildtools.run(argv, "the tool", timeout=0.4)
    assert _gone(int(pids.read_text()))


def test_output_and_failures(tmp_path: Path) -> None:
    argv = _script(tmp_path, "echo one; echo two >&2; printf 'no newline'; exit 3")
    lines: list[str] = []
    with pytest.raises(VmmError, match=r"the tool failed \(exit 3\): one \| two \| no newline"):
        buildtools.run_lines(argv, "the tool", lines.append)
    assert lines == ["one", "two", "no newline"]
    assert buildtools.run(_script(tmp_path, "echo ok"), "the tool") == "ok\n"
    with pytest.raises(VmmError, match="cannot run"):
        buildtools.run([str(tmp_path / "missing")], "the tool")


def test_the_tool_leads_its_own_group(tmp_path: Path) -> None:
    out = buildtools.run(_script(tmp_path, "ps -o pgid= -p $$"), "the tool")
    assert int(out) != os.getpgrp()
