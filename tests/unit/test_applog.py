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


def test_append_never_takes_either_file_past_the_bound(tmp_path: Path) -> None:
    log = AppLog(tmp_path / "app.log", max_bytes=100)
    log.append(b"a" * 70)
    log.append(b"b" * 70)  # 30 fit: the file is full, it becomes the older one, 40 start the next
    assert log.older.read_bytes() == b"a" * 70 + b"b" * 30 and log.path.read_bytes() == b"b" * 40
    log.append(bytes(range(250)))  # more than both files at once: only the newest bytes stay
    assert log.older.read_bytes() == bytes(range(60, 160)) and log.path.read_bytes() == bytes(range(160, 250))
    assert log.tail(1000) == bytes(range(60, 250))


def test_append_to_an_overgrown_file_keeps_only_its_newest_bytes(tmp_path: Path) -> None:
    log = AppLog(tmp_path / "app.log", max_bytes=100)
    _append(log.path, b"t" * 500)  # a template's boot log, written by QEMU itself
    log.append(b"new")
    assert log.older.read_bytes() == b"t" * 100 and log.path.read_bytes() == b"new"


async def test_the_console_reader_writes_the_bounded_log_and_drains_at_the_end(tmp_path: Path) -> None:
    from vmm.console import ConsoleReader

    log = AppLog(tmp_path / "app.log", max_bytes=1000)
    sock = tmp_path / "app.sock"
    connected: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()
    server = await asyncio.start_unix_server(lambda r, w: connected.set_result(w), str(sock))
    async with server:
        reader = await ConsoleReader.open("vtest", sock, log)
        assert reader is not None
        qemu = await connected
        for i in range(30):
            qemu.write(bytes([65 + i % 26]) * 100)
        await qemu.drain()
        qemu.close()  # QEMU ended: what it wrote is still taken before the reader stops
        await reader.close(drain=True)
    assert log.path.stat().st_size <= 1000 and log.older.stat().st_size <= 1000
    assert log.tail(100) == bytes([65 + 29 % 26]) * 100
    assert await ConsoleReader.open("vtest", tmp_path / "none.sock", log) is None


def test_limits_and_free_space(tmp_path: Path) -> None:
    check_limits(512, 2, 1024, "image")
    with pytest.raises(InvalidRequest, match=r"image\.vcpus"):
        check_limits(512, 17, 1024, "image")
    with pytest.raises(OverCapacity, match="not enough disk space for the test"):
        check_free_space(tmp_path / "not" / "yet", 1 << 62, "the test")
