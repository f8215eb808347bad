"""A VM's guest agent key. A fork's child gets one of its own at its first sync (vmm.own_key), against a scripted
guest agent: one that takes the new key, one from before keys could change, one that answers nothing well.
The key file is never read or written through a name the VM's QEMU could have planted in its directory."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path
from typing import cast

import pytest

from vmm.agent import (
    F_ERROR,
    F_SYNC,
    F_SYNC_OK,
    F_SYNC_REKEY,
    KEY_BYTES,
    Agent,
    AgentError,
    copy_key,
    load_key,
    store_key,
)
from vmm.errors import VmFailed
from vmm.live import LiveVm
from vmm.model import VmRecord, VmState
from vmm.own_key import take_own_key
from vmm.policy import Policy

HEAD = struct.Struct(">IBI")
PARENTS_KEY = bytes(32)


class ScriptedGuest:
    """The guest's end of an Agent: answers each sync at once, as the guest agent `kind` would."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.reader = asyncio.StreamReader()
        self.agent = Agent(self.reader, cast(asyncio.StreamWriter, self), PARENTS_KEY)

    def write(self, data: bytes) -> None:
        _, frame_kind, channel = HEAD.unpack_from(data)
        if self.kind == "current" and frame_kind == F_SYNC_REKEY:
            self._answer(channel, F_SYNC_OK, struct.pack(">QB", 1, 7))
        elif self.kind == "older" and frame_kind == F_SYNC:
            self._answer(channel, F_SYNC_OK, struct.pack(">QB", 1, 3))
        elif frame_kind == F_SYNC_REKEY:
            self._answer(channel, F_ERROR, b"unknown frame type 3")
        else:
            self._answer(channel, F_ERROR, b"sync: short frame")

    def _answer(self, channel: int, kind: int, payload: bytes) -> None:
        self.reader.feed_data(HEAD.pack(len(payload) + 5, kind, channel) + payload)

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        return None


def _child(guest: ScriptedGuest) -> LiveVm:
    vm = LiveVm(VmRecord("vchild", "sandbox", VmState.RUNNING, Policy(), 8080, 1.0, 1.0))
    vm.agent = guest.agent
    return vm


async def test_a_current_guest_takes_a_new_key_and_the_key_file_holds_it(tmp_path: Path) -> None:
    key_file = tmp_path / "agent.key"
    store_key(key_file, PARENTS_KEY)
    guest = ScriptedGuest("current")
    await take_own_key(_child(guest), key_file, 5.0, "its parent")
    assert guest.agent.key != PARENTS_KEY and len(guest.agent.key) == 32
    assert key_file.read_bytes() == guest.agent.key
    assert key_file.stat().st_mode & 0o777 == 0o600
    await guest.agent.close("done")


async def test_an_older_guest_agent_keeps_its_parents_key_and_is_still_synced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "agent.key"
    store_key(key_file, PARENTS_KEY)
    guest = ScriptedGuest("older")
    await take_own_key(_child(guest), key_file, 5.0, "its parent")
    assert guest.agent.key == PARENTS_KEY and key_file.read_bytes() == PARENTS_KEY
    assert "vm.rekey_refused" in capsys.readouterr().err
    await guest.agent.close("done")


async def test_a_guest_that_takes_no_sync_ends_the_child_and_its_key_file_is_untouched(tmp_path: Path) -> None:
    key_file = tmp_path / "agent.key"
    store_key(key_file, PARENTS_KEY)
    guest = ScriptedGuest("broken")
    with pytest.raises(VmFailed, match=r"took no fresh entropy.*refused the sync: sync: short frame"):
        await take_own_key(_child(guest), key_file, 5.0, "its parent")
    assert key_file.read_bytes() == PARENTS_KEY
    await guest.agent.close("done")


def test_a_key_is_made_once_then_read_back(tmp_path: Path) -> None:
    key = load_key(tmp_path / "agent.key")
    assert len(key) == KEY_BYTES and load_key(tmp_path / "agent.key") == key
    assert (tmp_path / "agent.key").stat().st_mode & 0o777 == 0o600


def test_a_planted_symlink_is_neither_read_nor_written_through(tmp_path: Path) -> None:
    secret = tmp_path / "root-only"
    secret.write_bytes(b"s" * KEY_BYTES)
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    (vm_dir / "agent.key").symlink_to(secret)
    with pytest.raises(OSError):
        load_key(vm_dir / "agent.key")  # not sent to the guest as its key
    (vm_dir / "agent.key.tmp").symlink_to(secret)
    store_key(vm_dir / "agent.key", bytes(KEY_BYTES))
    assert secret.read_bytes() == b"s" * KEY_BYTES
    assert not (vm_dir / "agent.key").is_symlink() and load_key(vm_dir / "agent.key") == bytes(KEY_BYTES)


def test_a_planted_fifo_does_not_block_and_is_replaced(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "agent.key")
    key = load_key(tmp_path / "agent.key")
    assert (tmp_path / "agent.key").read_bytes() == key


def test_a_copy_takes_the_key_as_it_is_and_never_makes_one_up(tmp_path: Path) -> None:
    source, target = tmp_path / "checkpoint.key", tmp_path / "agent.key"
    store_key(source, PARENTS_KEY)
    copy_key(source, target)
    assert target.read_bytes() == PARENTS_KEY and target.stat().st_mode & 0o777 == 0o600
    source.write_bytes(b"short")
    with pytest.raises(AgentError, match="does not hold an agent key"):
        copy_key(source, tmp_path / "other.key")  # a made-up key would be one its guest does not know
    assert source.read_bytes() == b"short" and not (tmp_path / "other.key").exists()
    with pytest.raises(AgentError):
        copy_key(tmp_path / "missing.key", tmp_path / "other.key")
