"""A hostile guest on its agent's port, and a failure after `cont`: the VM and its memory survive.

Root in the guest (an exec as uid 0) kills the guest agent, holds its virtio-serial port
before init's restart of the agent can, and answers the host itself: a short F_SYNC_OK to
every sync, an F_EXIT without its status to every exec, noise for channels and kinds nobody
asked for, and garbage when asked. Each is a clean error for the call it answers; the VM can
still be suspended, restored (its sync fails and is logged: the VM runs), left running by a
stopping manager, adopted and deleted, with no QEMU left.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import started_manager
from tests.e2e.guest import sandbox_run
from vmm import faults, jsonlog
from vmm.agent import MAX_NOISE_FRAMES, AgentError
from vmm.errors import VmFailed
from vmm.manager import VmManager
from vmm.model import VmState
from vmm.qemu import qemus_by_name
from vmm.settings import VmmSettings

HELD = "/tmp/hostile-holds-the-port"
TAKE_PORT = f"""
import glob, os, random, signal, struct, time
HEAD = struct.Struct(">IBI")

def frame(kind, channel, payload=b""):
    return HEAD.pack(len(payload) + 5, kind, channel) + payload

port = next("/dev/" + d.split("/")[-2] for d in glob.glob("/sys/class/virtio-ports/*/name")
            if open(d).read().strip() == "mvm.agent")
init = open("/proc/1/cmdline", "rb").read()
fd, deadline = None, time.monotonic() + 60
while fd is None and time.monotonic() < deadline:
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) > 1]:
        try:  # the agent and every restart of it: init's own binary, forked
            if open(f"/proc/{{pid}}/cmdline", "rb").read() == init:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        fd = os.open(port, os.O_RDWR)
    except OSError:
        time.sleep(0.01)
open("{HELD}", "w").close()
"""
HOSTILE = (
    TAKE_PORT
    + """
os.write(fd, frame(77, 12345, b"noise") + frame(11, 0, b"for nobody"))
buf = b""
while True:
    data = os.read(fd, 65536)
    if not data:  # no host on the other end (a suspend, a restore): look again soon
        time.sleep(0.05)
        continue
    buf += data
    while len(buf) >= 9:
        length, kind, channel = HEAD.unpack_from(buf)
        if len(buf) < 4 + length:
            break
        payload, buf = buf[9 : 4 + length], buf[4 + length :]
        if kind == 1:
            os.write(fd, frame(2, channel, b"\\x00\\x01\\x02"))  # a short F_SYNC_OK
        elif kind == 10 and b"garbage" in payload:
            os.write(fd, HEAD.pack(0xFFFFFFF0, 11, channel) + random.randbytes(256))
        elif kind == 10:
            os.write(fd, frame(13, channel) + frame(99, channel + 100000, b"?"))  # F_EXIT with no status
"""
)
# Tiny frames for no call, as fast as the port takes them: the host reads and drops each one.
FLOOD = (
    TAKE_PORT
    + """
noise = frame(11, 0, b"x") * 3000
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    os.write(fd, noise)
"""
)


def qemus_of(vm_id: str) -> list[int]:
    return qemus_by_name().get(f"mvm-{vm_id}", [])


@pytest.fixture
def events() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    jsonlog.configure("info", stream=stream)
    try:
        yield stream
    finally:
        jsonlog.configure("info", None)


async def test_a_hostile_guest_on_the_agents_port_breaks_nothing_on_the_host(
    settings: VmmSettings, sandbox_template: str, events: io.StringIO
) -> None:
    first = VmManager(settings)
    await first.start()
    try:
        vm = await first.create_vm(sandbox_template)
        assert await sandbox_run(vm.id, "x = 41; x") == 41
        hostile = await first.exec(vm.id, ["python3", "-c", HOSTILE], [], "/", 0, 0)
        async with asyncio.timeout(60):
            while not await sandbox_run(vm.id, f"__import__('os').path.exists({HELD!r})"):
                await asyncio.sleep(0.2)
        agent = first.records.get(vm.id).agent
        assert agent is not None
        with pytest.raises(AgentError, match=r"answered a sync with a malformed frame \(type 2, 3 bytes\)"):
            await agent.sync(vm.id, 5.0)
        ex = await first.exec(vm.id, ["true"], [], "/", 0, 0)
        malformed = b"the guest agent sent a malformed frame (type 13, 0 bytes)"
        assert [(e.kind, e.data) async for e in ex] == [("error", malformed)]
        ex = await first.exec(vm.id, ["garbage"], [], "/", 0, 0)
        ended = b"the guest agent's channel ended (the guest agent sent a frame of 4294967280 bytes)"
        assert [(e.kind, e.data) async for e in ex] == [("error", ended)]
        with pytest.raises(AgentError, match="channel is closed"):
            await first.exec(vm.id, ["true"], [], "/", 0, 0)
        await hostile.abandon()
        assert await sandbox_run(vm.id, "x") == 41, "the app serves whatever the agent's channel does"

        await first.suspend(vm.id)
        await first.ensure_running(vm.id)  # its sync gets a short answer again: logged, and the VM runs
        assert first.get(vm.id).state is VmState.RUNNING
        assert await sandbox_run(vm.id, "x + 1") == 42, "its memory came back"
        assert any('"vm.sync_failed"' in line and vm.id in line for line in events.getvalue().splitlines())
        ex = await first.exec(vm.id, ["true"], [], "/", 0, 0)
        assert [(e.kind, e.data) async for e in ex] == [("error", malformed)]
    finally:
        await first.close()  # on_shutdown "keep": the VM runs on; nothing its agent sent comes out of close
    second = VmManager(settings)
    await second.start()
    try:
        assert second.get(vm.id).state is VmState.RUNNING
        await second.delete(vm.id)
        assert qemus_of(vm.id) == [] and second.get(vm.id).state is VmState.TERMINATED
    finally:
        for rec in list(second.list_vms()):
            await second.delete(rec.id)
        await second.close()


async def test_a_guest_that_floods_its_agents_channel_cannot_stall_another_vms_exec(
    settings: VmmSettings, sandbox_template: str
) -> None:
    """Root in one guest writes tiny frames for no call without end: the manager drops them while another
    VM's execs and sync are answered, ends the flooder's channel with the reason, and deletes it."""
    async with started_manager(settings) as manager:
        flooder = await manager.create_vm(sandbox_template)
        other = await manager.create_vm(sandbox_template)
        flood = manager.records.get(flooder.id).agent
        agent = manager.records.get(other.id).agent
        assert flood is not None and agent is not None
        hostile = await manager.exec(flooder.id, ["python3", "-c", FLOOD], [], "/", 0, 0)
        async with asyncio.timeout(60):
            while not flood.dropped:  # the flooder holds the port: its noise arrives
                await asyncio.sleep(0.05)
        for n in range(3):
            ex = await manager.exec(other.id, ["echo", str(n)], [], "/", 0, 0)
            async with asyncio.timeout(30):
                events = [(e.kind, e.data, e.code) async for e in ex]
            assert events == [("stdout", f"{n}\n".encode(), 0), ("exit", b"", 0)]
        await agent.sync(other.id, 5.0)
        async with asyncio.timeout(60):
            while flood.dropped <= MAX_NOISE_FRAMES:
                await asyncio.sleep(0.05)
        with pytest.raises(AgentError, match=f"sent over {MAX_NOISE_FRAMES} frames in a row for no call"):
            await manager.exec(flooder.id, ["true"], [], "/", 0, 0)
        await hostile.abandon()
        assert await sandbox_run(other.id, "6 * 7") == 42
        await manager.delete(flooder.id)
        assert qemus_of(flooder.id) == []


async def test_a_failure_after_cont_leaves_the_vm_running_on_its_memory(
    settings: VmmSettings, sandbox_template: str, events: io.StringIO
) -> None:
    """The guest ran on its RAM file the moment `cont` went out: whatever fails after, the VM is never
    recorded suspended over a snapshot that no longer matches that RAM."""
    manager = VmManager(settings)
    await manager.start()
    try:
        vm = await manager.create_vm(sandbox_template)
        assert await sandbox_run(vm.id, "x = 41; x") == 41
        await manager.suspend(vm.id)  # the first suspend gives the VM its own RAM file
        faults.arm("restore.synced", "raise")
        try:
            await manager.ensure_running(vm.id)
        finally:
            faults.disarm_all()
        rec = manager.get(vm.id)
        assert rec.state is VmState.RUNNING and rec.pid in qemus_of(vm.id), rec.reason
        assert not (manager.vm_dir(vm.id) / "state").exists(), "the spent snapshot is gone"
        assert any('"vm.restore_step_failed"' in line and "restore.synced" in line
                   for line in events.getvalue().splitlines())  # fmt: skip
        assert await sandbox_run(vm.id, "x + 1") == 42, "the guest's memory is the one it had"
        await manager.suspend(vm.id)
        await manager.ensure_running(vm.id)
        assert await sandbox_run(vm.id, "x + 2") == 43, "the next cycle works too"
    finally:
        for rec in list(manager.list_vms()):
            await manager.delete(rec.id)
        await manager.close()
    assert qemus_of(vm.id) == []


async def test_a_qemu_that_dies_after_cont_fails_the_vm_and_never_leaves_it_suspended(
    settings: VmmSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its QEMU killed at restore.synced: the snapshot was spent on a guest that ran, so the VM is failed
    with the reason (and no QEMU is left), not suspended over a snapshot that no longer loads."""
    manager = VmManager(settings)
    await manager.start()
    point = faults.point

    def kill_qemu_at(name: str) -> None:
        if name == "restore.synced":
            pid = manager.get(vm.id).pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            raise faults.FaultInjected("its QEMU was killed at restore.synced")
        point(name)

    try:
        vm = await manager.create_vm("demo")
        await manager.suspend(vm.id)  # the first suspend gives the VM its own RAM file
        monkeypatch.setattr(faults, "point", kill_qemu_at)
        with pytest.raises(VmFailed, match="failed after its guest ran"):
            await manager.ensure_running(vm.id)
        rec = manager.get(vm.id)
        assert rec.state is VmState.FAILED and "its QEMU was killed" in (rec.reason or ""), rec.reason
        assert not (manager.vm_dir(vm.id) / "state").exists() and qemus_of(vm.id) == []
    finally:
        monkeypatch.undo()
        for rec in list(manager.list_vms()):
            await manager.delete(rec.id)
        await manager.close()
