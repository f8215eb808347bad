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

from bench.agent_fuzz import fuzz
from vmm.agent import F_ERROR, F_EXIT, F_STDOUT, F_SYNC_OK, MAX_FRAME, Agent, AgentError, ExecEvent

HEAD = struct.Struct(">IBI")


class Writer:
    """What the agent sends to the guest, kept for the test to look at."""

    def __init__(self) -> None:
        self.sent = bytearray()

    def write(self, data: bytes) -> None:
        self.sent += data

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        return None


def frame(kind: int, channel: int, payload: bytes = b"") -> bytes:
    return HEAD.pack(len(payload) + 5, kind, channel) + payload


def agent_on(reader: asyncio.StreamReader) -> Agent:
    return Agent(reader, cast(asyncio.StreamWriter, Writer()), bytes(32))


async def test_an_exit_without_its_status_ends_that_exec_with_an_error_and_the_channel_goes_on() -> None:
    reader = asyncio.StreamReader()
    agent = agent_on(reader)
    first_exec = await agent.exec(["true"], [], "/", 0, 0)
    reader.feed_data(frame(F_EXIT, 1))
    first = [event async for event in first_exec]
    malformed = b"the guest agent sent a malformed frame (type 13, 0 bytes)"
    assert [(e.kind, e.data) for e in first] == [("error", malformed)]
    second_exec = await agent.exec(["true"], [], "/", 0, 0)
    reader.feed_data(frame(F_STDOUT, 2, b"hi") + frame(F_EXIT, 2, struct.pack(">i", 3)))
    second = [event async for event in second_exec]
    assert [(e.kind, e.data, e.code) for e in second] == [("stdout", b"hi", 0), ("exit", b"", 3)]
    await agent.close("done")


async def test_a_short_sync_answer_is_an_agent_error_for_that_sync_only() -> None:
    reader = asyncio.StreamReader()
    agent = agent_on(reader)
    reader.feed_data(frame(F_SYNC_OK, 1, b"\x00\x01\x02"))
    with pytest.raises(AgentError, match=r"answered a sync with a malformed frame \(type 2, 3 bytes\)"):
        await agent.sync("v1", 5.0)
    reader.feed_data(frame(F_SYNC_OK, 2, struct.pack(">QB", 1, 3)))
    result = await agent.sync("v1", 5.0)
    assert result.entropy_added and result.crng_reseeded
    reader.feed_data(frame(F_ERROR, 3, b"sync: short frame"))
    with pytest.raises(AgentError, match="refused the sync: sync: short frame"):
        await agent.sync("v1", 5.0)
    await agent.close("done")


@pytest.mark.parametrize(
    ("kind", "payload"),
    [(99, b"what"), (F_SYNC_OK, bytes(9)), (F_EXIT, struct.pack(">i", 256)), (F_EXIT, struct.pack(">i", -65)),
     (F_EXIT, bytes(5))],
    ids=["unknown kind", "a sync answer on an exec", "exit 256", "signal 65", "exit of 5 bytes"],
)  # fmt: skip
async def test_a_frame_that_fits_no_event_ends_the_exec_with_an_error(kind: int, payload: bytes) -> None:
    reader = asyncio.StreamReader()
    agent = agent_on(reader)
    ex = await agent.exec(["true"], [], "/", 0, 0)
    reader.feed_data(frame(kind, 1, payload) + frame(F_STDOUT, 1, b"after its end: dropped"))
    events = [event async for event in ex]
    assert [e.kind for e in events] == ["error"] and b"malformed frame" in events[0].data
    ex = await agent.exec(["true"], [], "/", 0, 0)
    reader.feed_data(frame(F_EXIT, 2, struct.pack(">i", -9)))
    (killed,) = [event async for event in ex]
    assert (killed.kind, killed.code, killed.signal_name) == ("exit", -9, "SIGKILL")
    assert ExecEvent("exit", code=-40).signal_name == "SIG40"  # a real-time signal Python has no name for
    await agent.close("done")


async def test_frames_for_no_call_are_dropped() -> None:
    reader = asyncio.StreamReader()
    agent = agent_on(reader)
    noise = frame(F_STDOUT, 7, b"x") + frame(F_EXIT, 0) + frame(200, 2**32 - 1, b"\xff" * 100) + frame(F_SYNC_OK, 9)
    reader.feed_data(noise + frame(F_SYNC_OK, 1, struct.pack(">QB", 5, 0)))
    assert (await agent.sync("v1", 5.0)).entropy_added is False
    await agent.close("done")


@pytest.mark.parametrize("length", [0, 4, MAX_FRAME + 6, 2**32 - 1])
async def test_a_length_out_of_bounds_ends_the_channel_and_every_waiter_learns_why(length: int) -> None:
    reader = asyncio.StreamReader()
    agent = agent_on(reader)
    ex = await agent.exec(["sleep", "9"], [], "/", 0, 0)
    sync = asyncio.create_task(agent.sync("v1", 30.0))
    await asyncio.sleep(0)
    reader.feed_data(HEAD.pack(length, F_STDOUT, 1) + b"garbage")
    with pytest.raises(AgentError, match=f"frame of {length} bytes"):
        await sync
    events = [event async for event in ex]
    assert [e.kind for e in events] == ["error"] and f"frame of {length} bytes".encode() in events[0].data
    with pytest.raises(AgentError, match="channel is closed"):
        await agent.exec(["true"], [], "/", 0, 0)
    await agent.close("done")  # nothing the reader hit comes out of close


async def test_close_never_raises_and_ends_every_call() -> None:
    reader = asyncio.StreamReader()
    agent = agent_on(reader)
    ex = await agent.exec(["sleep", "9"], [], "/", 0, 0)
    sync = asyncio.create_task(agent.sync("v1", 30.0))
    reader.feed_data(frame(F_STDOUT, 1, b"half") + HEAD.pack(20, F_STDOUT, 1)[:5])  # a frame cut mid-head
    await asyncio.sleep(0)
    await agent.close("the VM was suspended")
    with pytest.raises(AgentError, match="the VM was suspended"):
        await sync
    assert [(e.kind, e.data) async for e in ex] == [("stdout", b"half"), ("error", b"the VM was suspended")]
    await agent.close("twice")


async def test_fuzz_100k_random_and_mutated_frames() -> None:
    """Never a dead reader, never a waiter left hanging, never a raising close; each call gets what its frames meant."""
    stats = await fuzz(100_000, seed=13)
    assert stats.frames >= 100_000
    assert {"sync ok", "sync error", "exec exit", "exec error"} <= set(stats.outcomes), stats.outcomes
