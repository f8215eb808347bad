"""Checkpoint names, the config keys that bound checkpoints, and reading a qcow2 backing chain."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from aiohttp import web

from edge.checkpoint_api import parse_from_checkpoint
from mvm.config import load_config
from vmm import checkpoints, disks
from vmm.errors import ConfigError, InvalidRequest, VmmError
from vmm.model import RamMode


@pytest.mark.parametrize("name", ["", "A", "-x", "a/b", "x" * 64, 3])
def test_bad_checkpoint_names_are_refused(name: object) -> None:
    with pytest.raises(InvalidRequest, match="checkpoint name"):
        checkpoints.check_name(name)


def test_from_checkpoint_needs_vm_and_name() -> None:
    assert parse_from_checkpoint("vabc/a") == ("vabc", "a")
    for bad in ("vabc", "vabc/", "/a", "a/b/c", 7):
        with pytest.raises(web.HTTPUnprocessableEntity, match="from_checkpoint"):
            parse_from_checkpoint(bad)


def test_checkpoint_limits_are_config_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[vmm]\nmax_checkpoints = 3\ncheckpoint_max_mb = 64\nmax_chain_depth = 2\n")
    vmm = load_config(path).vmm
    assert (vmm.max_checkpoints, vmm.checkpoint_max_mb, vmm.max_chain_depth) == (3, 64, 2)
    path.write_text("[vmm]\nmax_chain_depth = 1\n")
    with pytest.raises(ConfigError, match=r"vmm\.max_chain_depth"):
        load_config(path)


def test_backing_chain_follows_relative_layers(tmp_path: Path) -> None:
    base = tmp_path / "t" / "disk.base"
    base.parent.mkdir()
    base.write_bytes(b"\0" * 65536)
    (tmp_path / "a" / "checkpoints" / "c").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    layer = tmp_path / "a" / "checkpoints" / "c" / "disk.qcow2"
    top = tmp_path / "b" / "disk.qcow2"
    asyncio.run(disks.create_overlay(base, layer))
    asyncio.run(disks.create_layer(layer, top))
    assert disks.backing_chain(top) == [layer, base.resolve()]
    copy = tmp_path / "a" / "checkpoints" / "c2.qcow2"
    asyncio.run(disks.copy_layer(top, copy))
    assert disks.backing_chain(copy) == [layer, base.resolve()]
    assert disks.backing_file(base) is None


def test_a_ram_copy_keeps_contents_and_holes(tmp_path: Path) -> None:
    """A checkpoint's RAM file is copied in the kernel (copy_file_range over the written runs): the copy
    reads the same, its holes stay holes, and a file already there is never written over."""
    ram = tmp_path / "ram"
    size, page = 64 << 20, 4096
    with ram.open("wb") as f:
        f.truncate(size)
        for offset, data in ((0, b"a" * page), (20 << 20, bytes(range(256)) * 64), (size - page, b"z" * page)):
            f.seek(offset)
            f.write(data)
    copy = tmp_path / "copy"
    asyncio.run(disks.copy_extents(ram, copy))
    assert copy.stat().st_size == size and copy.read_bytes() == ram.read_bytes()
    assert disks.allocated_bytes(copy) < 1 << 20
    with pytest.raises(FileExistsError):
        asyncio.run(disks.copy_extents(ram, copy))  # never over an existing file, which stays
    assert copy.read_bytes() == ram.read_bytes()


def test_a_copy_never_reads_through_a_planted_symlink_or_fifo(tmp_path: Path) -> None:
    secret = tmp_path / "root-only"
    secret.write_bytes(b"secret")
    vm_dir = tmp_path / "vm"  # its QEMU's uid's: what it plants there is not followed into a checkpoint
    vm_dir.mkdir()
    (vm_dir / "ram").symlink_to(secret)
    with pytest.raises(OSError):
        asyncio.run(disks.copy_extents(vm_dir / "ram", tmp_path / "copy"))
    os.mkfifo(vm_dir / "disk.qcow2")
    with pytest.raises(VmmError, match="not a regular file"):
        asyncio.run(disks.copy_extents(vm_dir / "disk.qcow2", tmp_path / "copy"))
    assert not (tmp_path / "copy").exists()


def _files(vm_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in vm_dir.iterdir() if p.is_file()}


def test_an_interrupted_rewind_of_a_suspended_vm_puts_its_files_back(tmp_path: Path) -> None:
    aside = tmp_path / ".rewind-undo"
    aside.mkdir()
    for name in ("state", "state.sha256", "ram", "disk.qcow2"):
        (aside / name).write_text("own")
    (aside / ".complete").touch()
    (tmp_path / "state").write_text("checkpoint's")  # placement had begun: the rest never came
    mode = checkpoints.finish_interrupted_rewind(tmp_path, suspended=True)
    assert mode is RamMode.OWN_FILE
    assert _files(tmp_path) == dict.fromkeys(("state", "state.sha256", "ram", "disk.qcow2"), "own")
    assert not aside.exists()


def test_a_rewind_cut_short_while_setting_aside_keeps_what_was_left(tmp_path: Path) -> None:
    aside = tmp_path / ".rewind-undo"
    aside.mkdir()
    (aside / "state").write_text("own")
    (tmp_path / "disk.qcow2").write_text("own")  # not moved yet: no marker
    assert checkpoints.finish_interrupted_rewind(tmp_path, suspended=True) is RamMode.TEMPLATE_COW
    assert _files(tmp_path) == {"state": "own", "disk.qcow2": "own"}


def test_a_rewound_vm_whose_guest_runs_keeps_the_checkpoints_files(tmp_path: Path) -> None:
    (tmp_path / ".rewind-undo").mkdir()
    (tmp_path / ".rewind-undo" / "disk.qcow2").write_text("own")
    (tmp_path / "disk.qcow2").write_text("checkpoint's")
    assert checkpoints.finish_interrupted_rewind(tmp_path, suspended=False) is None
    assert _files(tmp_path) == {"disk.qcow2": "checkpoint's"}
    assert checkpoints.finish_interrupted_rewind(tmp_path, suspended=True) is None  # nothing set aside: nothing to do
