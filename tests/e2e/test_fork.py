"""Checkpoints, rewind and fork on real python-sandbox guests (vmm.checkpoints, vmm.forks).

One manager and one parent VM serve every test of the module (the suite's time bound): each test
leaves the parent running and deletes the children it made.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import stat
import tempfile
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio

from tests.e2e.conftest import started_manager
from tests.e2e.guest import sandbox_run
from vmm import disks, faults
from vmm.agent import Agent, ExecEvent
from vmm.errors import Conflict, InvalidRequest, NotFound, VmmError
from vmm.manager import VmManager
from vmm.model import VmState
from vmm.settings import VmmSettings

pytestmark = pytest.mark.asyncio(loop_scope="module")

_PROC = "import os; (os.getpid(), open('/proc/self/stat').read().split()[21])"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def parent(module_settings: VmmSettings, sandbox_template: str) -> AsyncIterator[tuple[VmManager, str]]:
    """A parent VM under the session's short root: QMP socket paths (a checkpoint's RAM work directory's
    too) stay under the 108 bytes a unix socket path may have."""
    async with started_manager(module_settings) as mgr:
        rec = await mgr.create_vm(sandbox_template)
        yield mgr, rec.id


async def _children_gone(mgr: VmManager, ids: list[str]) -> None:
    for vm_id in reversed(ids):
        await mgr.delete(vm_id)


async def test_fork_keeps_the_parents_moment_and_children_are_their_own(parent: tuple[VmManager, str]) -> None:
    mgr, vm_id = parent
    await sandbox_run(vm_id, "x = 41; open('/data/f.txt', 'w').write('parent')")
    seq = mgr.records.events.last_seq
    children = [c.id for c in await mgr.fork(vm_id, 3)]
    try:
        parents_events = mgr.records.events.after(seq, vms=[vm_id], types=["checkpoint_created", "forked"])
        assert [ev.type for ev in parents_events] == ["checkpoint_created", "forked"]  # in the event feed
        assert parents_events[1].extra == {"checkpoint": parents_events[0].extra["checkpoint"], "children": children}
        for i, child in enumerate(children):
            assert await sandbox_run(child, "x + 1") == 42
            assert await sandbox_run(child, "open('/data/f.txt').read()") == "parent"
            await sandbox_run(child, f"x = {i}; open('/data/own.txt', 'w').write('{i}')")
        assert await sandbox_run(vm_id, "x") == 41
        assert await sandbox_run(vm_id, "import os; os.path.exists('/data/own.txt')") is False
        for i, child in enumerate(children):
            assert await sandbox_run(child, "x") == i
            assert await sandbox_run(child, "open('/data/own.txt').read()") == str(i)
        seen = [await sandbox_run(v, "__import__('os').urandom(16)") for v in (vm_id, *children)]
        assert len(set(seen)) == len(seen)
        hostnames = [await sandbox_run(c, "__import__('socket').gethostname()") for c in children]
        assert hostnames == children
    finally:
        await _children_gone(mgr, children)


async def _exec_true(agent: Agent | None) -> list[ExecEvent]:
    assert agent is not None
    return [event async for event in await agent.exec(["true"], [], "/", 0, 0)]


async def test_each_child_gets_an_agent_key_of_its_own(parent: tuple[VmManager, str]) -> None:
    """A child wakes knowing its parent's agent key; its first sync gives it a new one: it answers exec
    with that key, refuses its parent's, and still takes it after a suspend (the key file is what it holds)."""
    mgr, vm_id = parent
    (child,) = [c.id for c in await mgr.fork(vm_id, 1)]
    try:
        parent_key = (mgr.settings.vms_dir / vm_id / "agent.key").read_bytes()
        key_file = mgr.settings.vms_dir / child / "agent.key"
        own = key_file.read_bytes()
        assert len(own) == 32 and own != parent_key
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        agent = mgr.records.get(child).agent
        assert agent is not None and agent.key == own
        assert [e.kind for e in await _exec_true(agent)] == ["exit"]
        agent.key = parent_key
        refused = await _exec_true(agent)
        assert [e.kind for e in refused] == ["error"] and b"does not carry this VM's key" in refused[0].data
        agent.key = own
        await mgr.suspend(child)
        await mgr.resume(child)
        assert [e.kind for e in await _exec_true(mgr.records.get(child).agent)] == ["exit"]
        parents = mgr.records.get(vm_id).agent  # the parent keeps its own
        assert parents is not None and parents.key == parent_key
        assert [e.kind for e in await _exec_true(parents)] == ["exit"]
    finally:
        await _children_gone(mgr, [child])


async def test_rewind_brings_back_memory_disk_and_the_same_process(parent: tuple[VmManager, str]) -> None:
    mgr, vm_id = parent
    await sandbox_run(vm_id, "x = 1; open('/data/r.txt', 'w').write('a')")
    proc = await sandbox_run(vm_id, _PROC)
    await mgr.create_checkpoint(vm_id, "a")
    assert mgr.get(vm_id).state is VmState.RUNNING  # paused for the capture only
    await sandbox_run(vm_id, "x = 2; open('/data/r.txt', 'w').write('b')")
    await mgr.rewind(vm_id, "a")
    assert mgr.get(vm_id).state is VmState.RUNNING
    assert [ev.type for ev in mgr.records.events.after(0, vms=[vm_id], types=["rewound"])][-1:] == ["rewound"]
    assert await sandbox_run(vm_id, "x") == 1
    assert await sandbox_run(vm_id, "open('/data/r.txt').read()") == "a"
    assert await sandbox_run(vm_id, _PROC) == proc
    listed = mgr.list_checkpoints(vm_id)
    assert [c.name for c in listed if c.name == "a"] == ["a"] and listed[0].size_bytes() > 0
    with pytest.raises(Conflict, match="in use by VM"):  # the rewound VM's disk reads through its layer
        await mgr.delete_checkpoint(vm_id, "a")


async def test_checkpoint_while_suspended_then_fork_from_it(parent: tuple[VmManager, str]) -> None:
    mgr, vm_id = parent
    await sandbox_run(vm_id, "y = 'asleep'; 0")
    await mgr.suspend(vm_id)
    await mgr.create_checkpoint(vm_id, "zz")
    assert mgr.get(vm_id).state is VmState.SUSPENDED  # no wake
    children = [c.id for c in await mgr.fork(vm_id, 2, checkpoint="zz")]
    try:
        assert [await sandbox_run(c, "y") for c in children] == ["asleep", "asleep"]
        with pytest.raises(Conflict, match="in use by"):
            await mgr.delete_checkpoint(vm_id, "zz")
        with pytest.raises(Conflict, match="in use by"):
            await mgr.delete(vm_id)
        await mgr.suspend(children[0])  # a child suspends and wakes like any VM
        await mgr.resume(children[0])
        assert await sandbox_run(children[0], "y") == "asleep"
        grandchildren = [c.id for c in await mgr.fork(children[1], 1)]  # a fork of a fork
        assert await sandbox_run(grandchildren[0], "y") == "asleep"
        children += grandchildren
    finally:
        await _children_gone(mgr, children)
    await mgr.resume(vm_id)


async def test_bad_input_is_refused_naming_the_problem(parent: tuple[VmManager, str]) -> None:
    mgr, vm_id = parent
    for count in (0, 33):
        with pytest.raises(InvalidRequest, match="count must be"):
            await mgr.fork(vm_id, count)
    with pytest.raises(NotFound, match="no checkpoint 'nope'"):
        await mgr.rewind(vm_id, "nope")
    await mgr.create_checkpoint(vm_id, "taken")
    with pytest.raises(Conflict, match="already"):
        await mgr.create_checkpoint(vm_id, "taken")
    with pytest.raises(NotFound):
        await mgr.fork("vnosuchvm000", 1)
    mgr.checkpoints.forking[(vm_id, "taken")] = 1  # a fork from it is under way
    try:
        with pytest.raises(Conflict, match="being forked from"):
            await mgr.rewind(vm_id, "taken")
    finally:
        del mgr.checkpoints.forking[(vm_id, "taken")]
    await mgr.delete_checkpoint(vm_id, "taken")
    failed = await mgr.create_vm(mgr.get(vm_id).template)
    try:
        pid = failed.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):  # bounded: the exit is seen through a pidfd
            if failed.state is VmState.FAILED:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(Conflict, match="is failed: only a live VM can be forked"):
            await mgr.fork(failed.id, 1)
    finally:
        await mgr.delete(failed.id)


@pytest.mark.parametrize("point", ["checkpoint.saved", "checkpoint.written", "fork.prepared"])
async def test_faults_leave_the_parent_intact_and_nothing_behind(
    parent: tuple[VmManager, str], point: str
) -> None:
    mgr, vm_id = parent
    before = {c.name for c in mgr.list_checkpoints(vm_id)}
    vms_before = {r.id for r in mgr.list_vms()}
    faults.arm(point, "raise")
    try:
        with pytest.raises(VmmError, match=f"fault injected at {point}"):
            await mgr.fork(vm_id, 1) if point.startswith("fork") else await mgr.create_checkpoint(vm_id, "f")
    finally:
        faults.disarm_all()
    assert mgr.get(vm_id).state is VmState.RUNNING
    assert await sandbox_run(vm_id, "1 + 1") == 2
    after = {c.name for c in mgr.list_checkpoints(vm_id)}
    assert after - before <= {n for n in after if n.startswith("fork-")}
    assert not list((mgr.settings.vms_dir / vm_id / "checkpoints").glob(".*"))
    assert {r.id for r in mgr.list_vms()} == vms_before
    for name in after - before:
        await mgr.delete_checkpoint(vm_id, name)


async def test_deep_chains_are_flattened_while_the_vm_serves(parent: tuple[VmManager, str]) -> None:
    mgr, vm_id = parent
    mgr.settings = replace(mgr.settings, max_chain_depth=2)
    try:
        await sandbox_run(vm_id, "open('/data/deep.txt', 'w').write('one')")
        await mgr.create_checkpoint(vm_id, "d1")
        await mgr.rewind(vm_id, "d1")
        await mgr.create_checkpoint(vm_id, "d2")
        await mgr.rewind(vm_id, "d2")  # overlay -> d2 -> d1 -> base: past the bound, a block-stream job starts
        overlay = mgr.settings.vms_dir / vm_id / "disk.qcow2"
        for _ in range(300):  # bounded: the job copies a few MiB
            assert await sandbox_run(vm_id, "open('/data/deep.txt').read()") == "one"  # it serves meanwhile
            if len(disks.backing_chain(overlay)) == 1:
                break
            await asyncio.sleep(0.1)
        assert len(disks.backing_chain(overlay)) == 1
        await mgr.delete_checkpoint(vm_id, "d2")
        await mgr.delete_checkpoint(vm_id, "d1")
    finally:
        mgr.settings = replace(mgr.settings, max_chain_depth=VmmSettings().max_chain_depth)


async def test_a_template_from_a_session(parent: tuple[VmManager, str]) -> None:
    mgr, vm_id = parent
    await sandbox_run(vm_id, "configured = 'yes'; 0")
    name = f"sess{secrets.token_hex(3)}"
    tpl = await mgr.create_template_from(name, vm_id)
    try:
        session_key = Path(tpl.path) / "agent.key"  # the session's guest knew it: root's alone
        assert stat.S_IMODE(session_key.stat().st_mode) == 0o400
        rec = await mgr.create_vm(tpl.name)
        assert await sandbox_run(rec.id, "configured") == "yes"
        own = (mgr.settings.vms_dir / rec.id / "agent.key").read_bytes()  # the clone took a key of its own
        assert own != session_key.read_bytes() and mgr.records.get(rec.id).agent.key == own
        assert [e.kind for e in await _exec_true(mgr.records.get(rec.id).agent)] == ["exit"]
        await mgr.delete(rec.id)
    finally:
        mgr.remove_template(name)
    await mgr.delete_checkpoint(vm_id, f"template-{name}")


async def test_checkpoints_survive_a_restart_and_move_with_the_vm(parent: tuple[VmManager, str]) -> None:
    """A second manager on its own state directory stands in for the fleet's second host: the move is
    the host API's (export a suspended VM's directory as it is, adopt it there)."""
    mgr, vm_id = parent
    rec = await mgr.create_vm(mgr.get(vm_id).template)
    moved = rec.id
    other_state = Path(tempfile.mkdtemp(prefix="h", dir=mgr.settings.state_dir.parent))
    (other_state / "images").symlink_to(mgr.settings.state_dir / "images")
    (other_state / "templates").symlink_to((mgr.settings.state_dir / "templates").resolve())
    other = VmmSettings(state_dir=other_state)
    try:
        await sandbox_run(moved, "z = 'kept'; 0")
        await mgr.create_checkpoint(moved, "p")
        await sandbox_run(moved, "z = 'changed'; 0")
        await mgr.suspend(moved)
        exported, tpl, files = await mgr.begin_export(moved)
        there = VmManager(other)
        await there.start()
        try:
            incoming = other.vms_dir / f".import-{moved}"
            shutil.copytree(files, incoming, symlinks=True, ignore=shutil.ignore_patterns("*.sock"))  # as export's tar
            await there.adopt_moved(replace(exported), incoming, tpl.created_at)
            await mgr.end_export(moved, "host2")
            assert [c.name for c in there.list_checkpoints(moved)] == ["p"]
        finally:
            await there.close()
        async with started_manager(other) as restarted:  # the second host restarted: the checkpoint is there
            assert [c.name for c in restarted.list_checkpoints(moved)] == ["p"]
            await restarted.rewind(moved, "p")
            assert await sandbox_run(moved, "z") == "kept"
    finally:
        if moved in mgr.records.live:
            await mgr.delete(moved)
