"""A disk's backing chain is named in a header its VM's QEMU can write: only files the manager made for
that VM pass (its template's base, its own checkpoints' layers, those of a checkpoint it was forked from)."""

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
    chain = disks.trusted_chain(vm_dir / "disk.qcow2", "v1", tpl / "disk.base", vms)
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
        disks.trusted_chain(vm_dir / "disk.qcow2", "v1", tpl / "disk.base", vms)


def test_a_link_planted_in_the_chain_is_refused(state: tuple[Path, Path, Path], tmp_path: Path) -> None:
    tpl, vms, vm_dir = state
    secret = tmp_path / "key.pem"
    secret.write_bytes(b"secret")
    link = vm_dir / "checkpoints" / "a" / "disk.qcow2"
    os.symlink(secret, link)  # the right name, someone else's file
    _layer(vm_dir / "disk.qcow2", link, "raw")
    with pytest.raises(VmmError, match="refused"):
        disks.trusted_chain(vm_dir / "disk.qcow2", "v1", tpl / "disk.base", vms)


def _checkpoint(vms: Path, holder: str, tpl: Path, children: list[str] | None) -> Path:
    ckpt = vms / holder / "checkpoints" / "c"
    ckpt.mkdir(parents=True)
    _layer(ckpt / "disk.qcow2", tpl / "disk.base", "raw")
    if children is not None:
        (ckpt / disks.CHILDREN).touch()
        for child in children:
            disks.admit_child(ckpt, child)
    return ckpt / "disk.qcow2"


def test_a_fork_child_reads_through_its_parents_checkpoint(state: tuple[Path, Path, Path]) -> None:
    tpl, vms, vm_dir = state
    _layer(vm_dir / "disk.qcow2", _checkpoint(vms, "parent", tpl, ["v0", "v1"]), "qcow2")
    chain = disks.trusted_chain(vm_dir / "disk.qcow2", "v1", tpl / "disk.base", vms)
    assert [p.name for p in chain] == ["disk.qcow2", "disk.base"]


def test_another_vms_checkpoint_it_was_not_forked_from_is_refused(state: tuple[Path, Path, Path]) -> None:
    tpl, vms, vm_dir = state
    _layer(vm_dir / "disk.qcow2", _checkpoint(vms, "other", tpl, ["v7"]), "qcow2")
    with pytest.raises(VmmError, match="refused"):
        disks.trusted_chain(vm_dir / "disk.qcow2", "v1", tpl / "disk.base", vms)


def test_a_fork_of_a_fork_reads_through_both_checkpoints(state: tuple[Path, Path, Path]) -> None:
    """v1 was forked from the child's checkpoint; the child from the parent's: each link is checked for
    the VM whose file names it."""
    tpl, vms, vm_dir = state
    parents = _checkpoint(vms, "parent", tpl, ["child"])
    child_ckpt = vms / "child" / "checkpoints" / "d"
    child_ckpt.mkdir(parents=True)
    _layer(child_ckpt / "disk.qcow2", parents, "qcow2")
    (child_ckpt / disks.CHILDREN).touch()
    disks.admit_child(child_ckpt, "v1")
    _layer(vm_dir / "disk.qcow2", child_ckpt / "disk.qcow2", "qcow2")
    assert len(disks.trusted_chain(vm_dir / "disk.qcow2", "v1", tpl / "disk.base", vms)) == 3
    (vms / "v2").mkdir()
    _layer(vms / "v2" / "disk.qcow2", parents, "qcow2")
    with pytest.raises(VmmError, match="refused"):  # the parent never forked v2
        disks.trusted_chain(vms / "v2" / "disk.qcow2", "v2", tpl / "disk.base", vms)
