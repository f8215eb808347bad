"""A disk's backing chain is named in a header its VM's QEMU can write: only files the manager made pass."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmm import disks
from vmm.errors import VmmError


def _layer(path: Path, backing: Path, fmt: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(backing), str(path)], check=True)


@pytest.fixture
def state(tmp_path: Path) -> tuple[Path, Path, Path]:
    tpl = tmp_path / "templates" / "t"
    tpl.mkdir(parents=True)
    (tpl / "disk.base").write_bytes(b"\0" * 65536)
    vm_dir = tmp_path / "vms" / "v1"
    (vm_dir / "checkpoints" / "a").mkdir(parents=True)
    return tpl, tmp_path / "vms", vm_dir


def test_a_template_base_and_checkpoint_layers_pass(state: tuple[Path, Path, Path]) -> None:
    tpl, vms, vm_dir = state
    _layer(vm_dir / "checkpoints" / "a" / "disk.qcow2", tpl / "disk.base", "raw")
    _layer(vm_dir / "disk.qcow2", vm_dir / "checkpoints" / "a" / "disk.qcow2", "qcow2")
    chain = disks.trusted_chain(vm_dir / "disk.qcow2", tpl, vms)
    assert [p.name for p in chain] == ["disk.qcow2", "disk.base"]


@pytest.mark.parametrize("target", ["/etc/shadow", "registry.db", "vms/v2/disk.qcow2", "checkpoints/a/ram"])
def test_a_header_naming_another_file_is_refused(state: tuple[Path, Path, Path], target: str) -> None:
    tpl, vms, vm_dir = state
    root = vms.parent
    named = Path(target) if target.startswith("/") else root / target
    if not target.startswith("/"):
        named = vm_dir / target if target.startswith("checkpoints") else named
        named.parent.mkdir(parents=True, exist_ok=True)
        named.write_bytes(b"secret")
    _layer(vm_dir / "disk.qcow2", named, "raw")
    with pytest.raises(VmmError, match="refused"):
        disks.trusted_chain(vm_dir / "disk.qcow2", tpl, vms)


def test_a_link_planted_in_the_chain_is_refused(state: tuple[Path, Path, Path], tmp_path: Path) -> None:
    tpl, vms, vm_dir = state
    secret = tmp_path / "key.pem"
    secret.write_bytes(b"secret")
    link = vm_dir / "checkpoints" / "a" / "disk.qcow2"
    os.symlink(secret, link)  # the right name, someone else's file
    _layer(vm_dir / "disk.qcow2", link, "raw")
    with pytest.raises(VmmError, match="refused"):
        disks.trusted_chain(vm_dir / "disk.qcow2", tpl, vms)
