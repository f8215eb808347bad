"""The host end of the guest agent against a hostile guest: every malformed frame is a clean error.

The agent reads from an in-memory stream here, so each test says exactly which bytes the
"guest" sent. The fuzz test feeds 100k random and mutated frames (fixed seed); the same
fuzz runs longer with `python -m bench.agent_fuzz --cases N`.
"""

from __future__ import annotations

import asyncio
import struct
from typing import cast

import pytest

from bench.agent_fuzz import FrameSink, fuzz
from vmm import agent as agent_module
from vmm.agent import (
    ENTROPY_BYTES,
    F_ERROR,
    F_EXIT,
    F_STDOUT,
    F_SYNC,
    F_SYNC_OK,
    F_SYNC_REKEY,
    MAX_FRAME,
    Agent,
    AgentError,
    ExecEvent,
    SyncResult,
)

HEAD = struct.Struct(">IBI")


class Guest(FrameSink):
    """The guest's end of an Agent: what the host sent (the channels of its calls, in order) and what to answer."""

    def __init__(self) -> None:
        super().__init__()
        self.reader = asyncio.StreamReader()
        self.agent = Agent(self.reader, cast(asyncio.StreamWriter, self), bytes(32))
        self.received: list[tuple[int, bytes]] = []  # each frame the host sent: its kind and payload

    def write(self, data: bytes) -> None:
        super().write(data)
        self.received.append((data[4], data[HEAD.size :]))

    def send(self, *frames: bytes) -> None:
        self.reader.feed_data(b"".join(frames))

    async def sync(self, timeout: float = 5.0, new_key: bytes | None = None) -> asyncio.Task[SyncResult]:
        """A sync under way, its F_SYNC (or F_SYNC_REKEY) sent: its channel is self.channels[-1]."""
        task = asyncio.create_task(self.agent.sync("v1", timeout, new_key))
        await asyncio.sleep(0)
        return task


def frame(kind: int, channel: int, payload: bytes = b"") -> bytes:
    return HEAD.pack(len(payload) + 5, kind, channel) + payload


async def test_an_exit_without_its_status_ends_that_exec_with_an_error_and_the_channel_goes_on() -> None:
    guest = Guest()
    first = await guest.agent.exec(["true"], [], "/", 0, 0)
    guest.send(frame(F_EXIT, first.channel))
    malformed = b"the guest agent sent a malformed frame (type 13, 0 bytes)"
    assert [(e.kind, e.data) async for e in first] == [("error", malformed)]
    second = await guest.agent.exec(["true"], [], "/", 0, 0)
    guest.send(frame(F_STDOUT, second.channel, b"hi"), frame(F_EXIT, second.channel, struct.pack(">i", 3)))
    assert [(e.kind, e.data, e.code) async for e in second] == [("stdout", b"hi", 0), ("exit", b"", 3)]
    await guest.agent.close("done")


async def test_a_short_sync_answer_is_an_agent_error_for_that_sync_only() -> None:
    guest = Guest()
    sync = await guest.sync()
    guest.send(frame(F_SYNC_OK, guest.channels[-1], b"\x00\x01\x02"))
    with pytest.raises(AgentError, match=r"answered a sync with a malformed frame \(type 2, 3 bytes\)"):
        await sync
    sync = await guest.sync()
    guest.send(frame(F_SYNC_OK, guest.channels[-1], struct.pack(">QB", 1, 3)))
    result = await sync
    assert result.entropy_added and result.crng_reseeded
    sync = await guest.sync()
    guest.send(frame(F_ERROR, guest.channels[-1], b"sync: short frame"))
    with pytest.raises(AgentError, match="refused the sync: sync: short frame"):
        await sync
    await guest.agent.close("done")


NEW_KEY = bytes(range(32))


async def test_a_rekey_sync_carries_both_keys_and_the_agent_uses_the_new_one_once_the_guest_took_it() -> None:
    guest = Guest()
    sync = await guest.sync(new_key=NEW_KEY)
    kind, payload = guest.received[-1]
    assert kind == F_SYNC_REKEY
    assert payload[:32] == bytes(32) and payload[32:64] == NEW_KEY  # the key the guest holds, then its next
    _, hostname_len = struct.unpack_from(">QH", payload, 64)
    assert payload[74 : 74 + hostname_len] == b"v1" and len(payload) == 74 + hostname_len + ENTROPY_BYTES
    assert guest.agent.key == bytes(32), "not before the guest answered"
    guest.send(frame(F_SYNC_OK, guest.channels[-1], struct.pack(">QB", 1, 7)))
    assert (await sync).crng_reseeded
    assert guest.agent.key == NEW_KEY
    await guest.agent.exec(["true"], [], "/", 0, 0)
    assert guest.received[-1][1][:32] == NEW_KEY
    await guest.sync()  # a plain sync carries one key, the new one
    assert guest.received[-1][0] == F_SYNC and guest.received[-1][1][:32] == NEW_KEY
    await guest.agent.close("done")


@pytest.mark.parametrize(
    ("kind", "payload", "error"),
    [(F_ERROR, b"unknown frame type 3", "refused the sync: unknown frame type 3"),
     (F_SYNC_OK, struct.pack(">QB", 1, 3), "without taking its new key"),
     (F_SYNC_OK, bytes(3), "malformed frame")],
    ids=["refused", "answered without taking it", "malformed answer"],
)  # fmt: skip
async def test_a_rekey_the_guest_did_not_take_leaves_the_key_as_it_was(kind: int, payload: bytes, error: str) -> None:
    guest = Guest()
    sync = await guest.sync(new_key=NEW_KEY)
    guest.send(frame(kind, guest.channels[-1], payload))
    with pytest.raises(AgentError, match=error):
        await sync
    assert guest.agent.key == bytes(32)
    await guest.agent.close("done")


async def test_a_guest_that_claims_a_rekey_nobody_asked_for_changes_nothing() -> None:
    guest = Guest()
    sync = await guest.sync()
    guest.send(frame(F_SYNC_OK, guest.channels[-1], struct.pack(">QB", 1, 7)))
    await sync
    assert guest.agent.key == bytes(32)
    with pytest.raises(AgentError, match="a new agent key has 32 bytes, not 5"):
        await guest.agent.sync("v1", 5.0, b"short")
    assert len(guest.received) == 1, "nothing was sent for a key of the wrong size"
    await guest.agent.close("done")


@pytest.mark.parametrize(
    ("kind", "payload"),
    [(99, b"what"), (F_SYNC_OK, bytes(9)), (F_EXIT, struct.pack(">i", 256)), (F_EXIT, struct.pack(">i", -65)),
     (F_EXIT, bytes(5))],
    ids=["unknown kind", "a sync answer on an exec", "exit 256", "signal 65", "exit of 5 bytes"],
)  # fmt: skip
async def test_a_frame_that_fits_no_event_ends_the_exec_with_an_error(kind: int, payload: bytes) -> None:
    guest = Guest()
    ex = await guest.agent.exec(["true"], [], "/", 0, 0)
    guest.send(frame(kind, ex.channel, payload), frame(F_STDOUT, ex.channel, b"after its end: dropped"))
    events = [event async for event in ex]
    assert [e.kind for e in events] == ["error"] and b"malformed frame" in events[0].data
    ex = await guest.agent.exec(["true"], [], "/", 0, 0)
    guest.send(frame(F_EXIT, ex.channel, struct.pack(">i", -9)))
    (killed,) = [event async for event in ex]
    assert (killed.kind, killed.code, killed.signal_name) == ("exit", -9, "SIGKILL")
    assert ExecEvent("exit", code=-40).signal_name == "SIG40"  # a real-time signal Python has no name for
    await guest.agent.close("done")


async def test_frames_for_no_call_are_dropped_and_channels_differ_per_connection() -> None:
    guest = Guest()
    sync = await guest.sync()
    channel = guest.channels[-1]
    noise = [frame(F_STDOUT, channel - 1, b"x"), frame(F_EXIT, 0), frame(200, 2**32 - 1, b"\xff" * 100)]
    guest.send(*noise, frame(F_SYNC_OK, channel, struct.pack(">QB", 5, 0)), frame(F_SYNC_OK, channel))
    assert (await sync).entropy_added is False
    # Output an exec left in the guest from an earlier connection (across a suspend or a manager
    # restart) carries that connection's channel numbers, which this one does not use.
    other = Guest()
    await other.sync()
    assert abs(other.channels[-1] - channel) > 1000
    await guest.agent.close("done")
    await other.agent.close("done")


async def test_a_flood_of_frames_for_no_call_ends_the_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Noise in a row past the bound ends the channel with the reason; a frame for a call resets the count."""
    monkeypatch.setattr(agent_module, "MAX_NOISE_FRAMES", 50)
    guest = Guest()
    ex = await guest.agent.exec(["true"], [], "/", 0, 0)
    guest.send(frame(F_STDOUT, 0, b"x") * 40, frame(F_STDOUT, ex.channel, b"hi"), frame(F_STDOUT, 0, b"x") * 40)
    guest.send(frame(F_EXIT, ex.channel, struct.pack(">i", 0)))
    assert [(e.kind, e.data) async for e in ex] == [("stdout", b"hi"), ("exit", b"")]
    guest.send(frame(F_STDOUT, 0, b"x") * 60)
    ended = "the guest agent sent over 50 frames in a row for no call"
    async with asyncio.timeout(5):
        while True:
            try:
                await guest.agent.send(F_STDOUT, 0, b"")
            except AgentError as exc:
                assert ended in str(exc)
                break
            await asyncio.sleep(0)
    assert guest.agent.dropped == 40 + 40 + 51
    await guest.agent.close("done")


async def test_a_flood_of_buffered_frames_shares_the_loop_with_other_work() -> None:
    """Whole frames already buffered: the reader yields after each, so another VM's calls interleave."""
    guest = Guest()
    guest.send(frame(F_STDOUT, 0, b"x") * 10_000)
    ticks = 0

    async def other_vm() -> None:
        nonlocal ticks
        while guest.agent.dropped < 10_000:
            ticks += 1
            await asyncio.sleep(0)

    async with asyncio.timeout(30):
        await other_vm()
    assert ticks > 5_000, "the other work ran between the flood's frames"
    await guest.agent.close("done")


@pytest.mark.parametrize("length", [0, 4, MAX_FRAME + 6, 2**32 - 1])
async def test_a_length_out_of_bounds_ends_the_channel_and_every_waiter_learns_why(length: int) -> None:
    guest = Guest()
    ex = await guest.agent.exec(["sleep", "9"], [], "/", 0, 0)
    sync = await guest.sync(30.0)
    guest.send(HEAD.pack(length, F_STDOUT, ex.channel) + b"garbage")
    with pytest.raises(AgentError, match=f"frame of {length} bytes"):
        await sync
    events = [event async for event in ex]
    assert [e.kind for e in events] == ["error"] and f"frame of {length} bytes".encode() in events[0].data
    with pytest.raises(AgentError, match="channel is closed"):
        await guest.agent.exec(["true"], [], "/", 0, 0)
    await guest.agent.close("done")  # nothing the reader hit comes out of close


async def test_close_never_raises_and_ends_every_call() -> None:
    guest = Guest()
    ex = await guest.agent.exec(["sleep", "9"], [], "/", 0, 0)
    sync = await guest.sync(30.0)
    guest.send(frame(F_STDOUT, ex.channel, b"half"), HEAD.pack(20, F_STDOUT, ex.channel)[:5])  # cut mid-head
    await asyncio.sleep(0)
    await guest.agent.close("the VM was suspended")
    with pytest.raises(AgentError, match="the VM was suspended"):
        await sync
    assert [(e.kind, e.data) async for e in ex] == [("stdout", b"half"), ("error", b"the VM was suspended")]
    await guest.agent.close("twice")


async def test_fuzz_100k_random_and_mutated_frames() -> None:
    """Never a dead reader, never a waiter left hanging, never a raising close; each call gets what its frames meant."""
    stats = await fuzz(100_000, seed=13)
    assert stats.frames >= 100_000
    assert {"sync ok", "sync error", "exec exit", "exec error"} <= set(stats.outcomes), stats.outcomes
