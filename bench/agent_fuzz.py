"""Fuzz the host end of the guest agent (vmm/agent.py) with the frames a hostile guest could send.

`python -m bench.agent_fuzz --cases 2000000 [--seed N]` runs as long as asked (bounded by
--cases); the unit suite runs the same checks on 100k frames with a fixed seed
(tests/unit/test_agent_fuzz.py).

Each session is one Agent on an in-memory stream with a few syncs and execs waiting on it.
It is fed random frames (any kind, any channel, payloads of any size, sometimes exactly the
size a kind needs) and mutated ones (bytes flipped in kind, channel or payload), and may end
in a broken framing (a length out of bounds, garbage, a cut-off frame) or be closed half-way.
An independent parse of the same bytes says what every call must get. The session fails if
the reader dies or ends anywhere else than where the framing does, if a call ends otherwise
than the frames meant (or an AgentError), if a waiter is left hanging, or if close() raises.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import cast

from vmm.agent import (
    F_ERROR,
    F_EXIT,
    F_STDERR,
    F_STDOUT,
    F_SYNC_OK,
    MAX_FRAME,
    Agent,
    AgentError,
    Exec,
    ExecEvent,
    SyncResult,
)

HEAD = struct.Struct(">IBI")  # the wire format, restated here so the fuzz does not trust the code under test
GUEST_KINDS = (F_SYNC_OK, F_STDOUT, F_STDERR, F_EXIT, F_ERROR)
KEY = bytes(32)
HANG_BOUND = 10.0  # seconds a session's calls may take to end once its stream has ended


class FuzzFailure(AssertionError):
    """A session broke one of the rules above; the message names the seed and session to replay."""


@dataclass
class Stats:
    sessions: int = 0
    frames: int = 0  # frames the reader had to take (up to where each stream's framing ends)
    syncs: int = 0
    execs: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


class FrameSink:
    """Where the agent's frames to the guest go: only their channels are kept (the calls to answer)."""

    def __init__(self) -> None:
        self.channels: list[int] = []

    def write(self, data: bytes) -> None:
        self.channels.append(HEAD.unpack_from(data)[2])

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        return None


def _payload(rng: random.Random, kind: int) -> bytes:
    if kind == F_EXIT and rng.random() < 0.5:
        code = rng.choice((0, 1, 127, 255, 256, -1, -9, -64, -65, 2**31 - 1, -(2**31)))
        return struct.pack(">i", code)
    if kind == F_SYNC_OK and rng.random() < 0.5:
        return rng.randbytes(rng.choice((9, 9, 9, 8, 10)))
    size = rng.choice((0, 0, 1, 3, 4, 5, 8, 9, 10, 17, 64)) if rng.random() < 0.97 else rng.randrange(1, 8192)
    return rng.randbytes(size)


def _frame(rng: random.Random, channels: list[int]) -> bytes:
    """A frame to one of the calls, a channel beside them, or any channel at all."""
    kind = rng.choice(GUEST_KINDS) if rng.random() < 0.85 else rng.randrange(256)
    channel = rng.choice(channels) if rng.random() < 0.9 else rng.getrandbits(32)
    payload = _payload(rng, kind)
    raw = bytearray(HEAD.pack(len(payload) + 5, kind, channel) + payload)
    if rng.random() < 0.1:  # mutated: a byte flipped anywhere but the length (that would be a broken framing)
        raw[rng.randrange(4, len(raw))] ^= 1 << rng.randrange(8)
    return bytes(raw)


def _broken_framing(rng: random.Random) -> bytes:
    """What ends a stream early: a length out of bounds, garbage, or a frame cut off by the end."""
    choice = rng.randrange(4)
    if choice == 0:
        return HEAD.pack(rng.choice((0, 1, 4, MAX_FRAME + 6, 2**32 - 1)), F_STDOUT, 1)
    if choice == 1:
        return rng.randbytes(rng.randrange(1, 64))
    if choice == 2:
        return HEAD.pack(100, F_STDOUT, 1) + rng.randbytes(rng.randrange(95))
    return HEAD.pack(rng.randrange(5, MAX_FRAME + 6), F_EXIT, 1)[: rng.randrange(1, 9)]


def _parse(data: bytes) -> tuple[list[tuple[int, int, bytes]], str]:
    """The frames a correct reader takes from `data`, and how its stream ends (the reason's telling part)."""
    frames: list[tuple[int, int, bytes]] = []
    at = 0
    while len(data) - at >= HEAD.size:
        length, kind, channel = HEAD.unpack_from(data, at)
        if not 5 <= length <= MAX_FRAME + 5:
            return frames, f"frame of {length} bytes"
        if len(data) - at < 4 + length:
            break
        frames.append((kind, channel, data[at + HEAD.size : at + 4 + length]))
        at += 4 + length
    return frames, "expected bytes"


def _expected_exec(frames: list[tuple[int, bytes]]) -> tuple[list[tuple[str, bytes, int]], bool]:
    """An exec's events from the frames on its channel, and whether one of them ended it."""
    events: list[tuple[str, bytes, int]] = []
    for kind, payload in frames:
        if kind in (F_STDOUT, F_STDERR):
            events.append(("stdout" if kind == F_STDOUT else "stderr", payload, 0))
            continue
        if kind == F_EXIT and len(payload) == 4 and -64 <= struct.unpack(">i", payload)[0] <= 255:
            events.append(("exit", b"", struct.unpack(">i", payload)[0]))
        else:
            events.append(("error", payload if kind == F_ERROR else b"", 0))
        return events, True
    return events, False


def _check_exec(name: str, got: list[ExecEvent], frames: list[tuple[int, bytes]], whole: bool) -> None:
    if not got or got[-1].kind not in ("exit", "error"):
        raise FuzzFailure(f"{name}: the exec did not end with exit or error: {got[-3:]}")
    if not whole:
        return
    want, ended = _expected_exec(frames)
    if not ended:
        want.append(("error", b"", 0))  # the channel's end says why
    seen = [(e.kind, e.data if e.kind != "error" else b"", e.code) for e in got]
    if seen[: len(want) - 1] != want[:-1] or (seen[-1][0], seen[-1][2]) != (want[-1][0], want[-1][2]):
        raise FuzzFailure(f"{name}: exec events {seen[:5]}... differ from the frames' {want[:5]}...")
    if want[-1][0] == "error" and ended and frames[len(want) - 1][0] == F_ERROR and got[-1].data != want[-1][1]:
        raise FuzzFailure(f"{name}: the guest's error text was not passed on")


def _check_sync(name: str, got: SyncResult | BaseException, frames: list[tuple[int, bytes]], whole: bool) -> str:
    if isinstance(got, SyncResult):
        if whole and not (frames and frames[0][0] == F_SYNC_OK and len(frames[0][1]) == 9):
            raise FuzzFailure(f"{name}: a sync succeeded on {frames[:1]}")
        return "sync ok"
    if not isinstance(got, AgentError):
        raise FuzzFailure(f"{name}: a sync raised {got!r}, not an AgentError")
    if whole and frames and frames[0][0] == F_SYNC_OK and len(frames[0][1]) == 9:
        raise FuzzFailure(f"{name}: a sync failed on a well-formed answer: {got}")
    return "sync error"


async def _consume(ex: Exec) -> list[ExecEvent]:
    return [event async for event in ex]


async def session(rng: random.Random, name: str, stats: Stats) -> None:
    """One agent, its waiting calls, one fuzzed stream; raises FuzzFailure on a broken rule."""
    n_sync, n_exec = rng.randrange(4), rng.randrange(5)
    close_early = rng.random() < 0.1
    reader, writer = asyncio.StreamReader(limit=2 * MAX_FRAME), FrameSink()
    agent = Agent(reader, cast(asyncio.StreamWriter, writer), KEY)
    syncs = [asyncio.create_task(agent.sync("vfuzz", HANG_BOUND * 6)) for _ in range(n_sync)]
    await asyncio.sleep(0)  # each sync takes its channel, in order, sends and waits for its answer
    execs = [await agent.exec(["true"], [], "/", 0, 0) for _ in range(n_exec)]
    consumers = [asyncio.create_task(_consume(ex)) for ex in execs]
    calls = writer.channels
    beside = [min(calls, default=7) - 1, max(calls, default=7) + 1, 0]
    frames = b"".join(_frame(rng, calls + beside) for _ in range(rng.randrange(1, 400)))
    if rng.random() < 0.3:
        frames += _broken_framing(rng)
    parsed, end = _parse(frames)
    at = 0
    while at < len(frames):  # in pieces, so frames also arrive split
        step = rng.choice((1, 9, 64, 4096, len(frames)))
        reader.feed_data(frames[at : at + step])
        at += step
        await asyncio.sleep(0)
        if close_early and rng.random() < 0.2:
            break
    if close_early:
        await agent.close("the fuzz closed it")
    else:
        reader.feed_eof()
    reader_task = agent._task  # the reader itself: it must end by itself, never by an exception
    try:
        async with asyncio.timeout(HANG_BOUND):
            results = await asyncio.gather(*syncs, return_exceptions=True)
            events = await asyncio.gather(*consumers)
            await asyncio.wait([reader_task])
    except TimeoutError:
        raise FuzzFailure(f"{name}: a call was still waiting {HANG_BOUND} s after its stream ended") from None
    if not close_early and reader_task.exception() is not None:
        raise FuzzFailure(f"{name}: the reader died: {reader_task.exception()!r}")
    try:
        await agent.send(F_ERROR, 0, b"")
    except AgentError as exc:
        reason = str(exc)
    else:
        raise FuzzFailure(f"{name}: the channel still takes frames after its stream ended")
    whole = not close_early
    if whole and end not in reason:
        raise FuzzFailure(f"{name}: the reader ended with {reason!r}, not where the framing does ({end})")
    try:
        await agent.close("the fuzz is done")
    except BaseException as exc:
        raise FuzzFailure(f"{name}: close() raised {exc!r}") from exc
    by_channel: dict[int, list[tuple[int, bytes]]] = {}
    for kind, channel, payload in parsed:
        by_channel.setdefault(channel, []).append((kind, payload))
    for channel, got in zip(calls, results, strict=False):  # the syncs' channels come first
        stats.count(_check_sync(f"{name} sync {channel}", got, by_channel.get(channel, []), whole))
    for ex, got_events in zip(execs, events, strict=True):
        _check_exec(f"{name} exec {ex.channel}", got_events, by_channel.get(ex.channel, []), whole)
        stats.count(f"exec {got_events[-1].kind}")
    stats.sessions += 1
    stats.frames += len(parsed)
    stats.syncs += n_sync
    stats.execs += n_exec


async def fuzz(cases: int, seed: int) -> Stats:
    """Sessions until at least `cases` frames went through the reader."""
    rng, stats = random.Random(seed), Stats()
    while stats.frames < cases:
        await session(rng, f"seed {seed} session {stats.sessions}", stats)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1_000_000, help="frames to feed the reader (default 1M)")
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    started = time.monotonic()
    try:
        stats = asyncio.run(fuzz(args.cases, args.seed))
    except FuzzFailure as exc:
        sys.exit(f"agent fuzz: FAILED: {exc}")
    took = time.monotonic() - started
    print(
        f"agent fuzz: {stats.frames} frames in {stats.sessions} sessions ({stats.syncs} syncs, {stats.execs} execs) "
        f"in {took:.1f} s, seed {args.seed}: no failure; outcomes {dict(sorted(stats.outcomes.items()))}"
    )


if __name__ == "__main__":
    main()
