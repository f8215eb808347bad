"""A VM's app log stays bounded while QEMU appends to it, and readers see the older part first."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from vmm.applog import AppLog
from vmm.capacity import check_free_space, check_limits
from vmm.errors import InvalidRequest, OverCapacity


def _append(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # as QEMU's chardev file does
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_rotation_keeps_at_most_two_files_and_the_newest_bytes(tmp_path: Path) -> None:
    log = AppLog(tmp_path / "app.log", max_bytes=100)
    _append(log.path, b"a" * 60)
    assert not log.rotate_if_needed()
    _append(log.path, b"b" * 60)
    assert log.rotate_if_needed()
    assert log.path.stat().st_size == 0 and log.older.read_bytes() == b"a" * 40 + b"b" * 60
    _append(log.path, b"c" * 10)  # appends continue at the new end
    assert log.tail(1000) == b"a" * 40 + b"b" * 60 + b"c" * 10
    assert log.tail(15) == b"b" * 5 + b"c" * 10


def test_after_a_burst_the_older_file_holds_only_the_newest_max_bytes(tmp_path: Path) -> None:
    log = AppLog(tmp_path / "app.log", max_bytes=1000)
    for i in range(20):  # 20 times the bound between two checks
        _append(log.path, bytes([65 + i]) * 1000)
    assert log.rotate_if_needed()
    assert log.older.read_bytes() == b"T" * 1000 and log.path.stat().st_size == 0
    assert not log.older.with_name("app.log.1.tmp").exists()


async def test_follow_sees_new_bytes_and_survives_rotation(tmp_path: Path) -> None:
    log = AppLog(tmp_path / "app.log", max_bytes=10)
    _append(log.path, b"old\n")
    running = True
    seen: list[bytes] = []

    async def reader() -> None:
        async for chunk in log.follow(lambda: running):
            seen.append(chunk)

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.05)
    _append(log.path, b"first line that is long\n")
    await asyncio.sleep(0.4)
    log.rotate_if_needed()
    _append(log.path, b"after\n")
    await asyncio.sleep(0.4)
    running = False
    await asyncio.wait_for(task, 2)
    assert b"".join(seen) == b"first line that is long\nafter\n"


def test_limits_and_free_space(tmp_path: Path) -> None:
    check_limits(512, 2, 1024, "image")
    with pytest.raises(InvalidRequest, match=r"image\.vcpus"):
        check_limits(512, 17, 1024, "image")
    with pytest.raises(OverCapacity, match="not enough disk space for the test"):
        check_free_space(tmp_path / "not" / "yet", 1 << 62, "the test")
