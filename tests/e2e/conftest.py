"""End-to-end fixtures: real QEMU guests from the project's own image, one template per run.

The image is built by scripts/install.sh into var/images. The template is booted once per
test session; every test gets its own state directory (sharing the template read-only)
and a finaliser that removes every VM, namespace, process and file it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import uvloop

from tests.e2e.guest import qemu_pids_under
from vmm.accel import choose
from vmm.manager import VmManager
from vmm.network import netns
from vmm.settings import VmmSettings
from vmm.template import create as create_template

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "var" / "images"
SANDBOX_IMAGE = "python-sandbox"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def session_root() -> Iterator[Path]:
    """Short absolute path (QMP socket paths must stay under 108 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="mvmt-", dir="/tmp"))
    try:
        yield root
    finally:
        _kill_qemus(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def template_dir(session_root: Path) -> Path:
    """Boot the demo image once and snapshot it as template 'demo'."""
    if not (IMAGES / "demo" / "image.json").exists():
        pytest.fail("guest image missing: run scripts/install.sh (builds var/images/demo)")
    settings = VmmSettings(state_dir=session_root / "base")
    settings.state_dir.mkdir()
    (settings.state_dir / "images").symlink_to(IMAGES)
    uvloop.run(create_template(settings, "demo", "demo", choose(settings.accelerator), lambda _: None))
    return settings.templates_dir


@pytest.fixture(scope="session")
def sandbox_template(session_root: Path, template_dir: Path) -> str:
    """The python-sandbox image (a Dockerfile, built by scripts/install.sh) as template 'sandbox'."""
    if not (IMAGES / SANDBOX_IMAGE / "image.json").exists():
        pytest.fail(f"guest image {SANDBOX_IMAGE} missing: run scripts/install.sh (builds var/images/{SANDBOX_IMAGE})")
    settings = VmmSettings(state_dir=session_root / "base")
    uvloop.run(create_template(settings, "sandbox", SANDBOX_IMAGE, choose(settings.accelerator), lambda _: None))
    return "sandbox"


@pytest.fixture
def settings(session_root: Path, template_dir: Path, request: pytest.FixtureRequest) -> Iterator[VmmSettings]:
    """A fresh state dir per test, sharing images and templates; cleaned up whatever happens."""
    state = Path(tempfile.mkdtemp(prefix="t", dir=session_root))
    (state / "images").symlink_to(IMAGES)
    (state / "templates").symlink_to(template_dir)
    namespaces_before = set(netns.list_project_namespaces())
    try:
        yield replace(VmmSettings(), state_dir=state)
    finally:
        _kill_qemus(state)
        vms = state / "vms"
        for vm_dir in vms.iterdir() if vms.exists() else []:
            asyncio.run(netns.delete(vm_dir.name))
        leaked = set(netns.list_project_namespaces()) - namespaces_before
        for name in leaked if not _other_test_runs() else ():  # theirs would be new here too
            if not _in_use(name):  # one with a live QEMU in it belongs to a test of another run, started meanwhile
                asyncio.run(netns.delete(name.removeprefix("mvm-")))
        shutil.rmtree(state, ignore_errors=True)


@asynccontextmanager
async def started_manager(settings: VmmSettings) -> AsyncIterator[VmManager]:
    """A started manager whose VMs are all deleted when the block ends."""
    mgr = VmManager(settings)
    await mgr.start()
    try:
        yield mgr
    finally:
        for rec in reversed(mgr.list_vms()):  # newest first: forked children before their parents
            await mgr.delete(rec.id)
        await mgr.close()


@pytest.fixture
async def manager(settings: VmmSettings) -> AsyncIterator[VmManager]:
    """A started manager whose VMs are all deleted at the end of the test."""
    async with started_manager(settings) as mgr:
        yield mgr


def _other_test_runs() -> bool:
    """Whether another pytest runs on this machine: namespaces it made during this test are not ours.

    This run's own ancestors (a `timeout ... pytest` wrapper) and descendants do not count.
    """
    parents: dict[int, int] = {}
    pytests: list[int] = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if b"pytest" in (proc / "cmdline").read_bytes():
                pytests.append(int(proc.name))

    def line(pid: int) -> set[int]:
        seen = set()
        while pid > 1 and pid not in seen:
            seen.add(pid)
            pid = parents.get(pid, 0)
        return seen

    mine = line(os.getpid())
    return any(pid not in mine and os.getpid() not in line(pid) for pid in pytests)


def _in_use(namespace: str) -> bool:
    """Whether a process runs in the named network namespace (this test's QEMUs are killed by then)."""
    try:
        inode = (netns.NETNS_DIR / namespace).stat().st_ino
    except FileNotFoundError:
        return False
    for ns in Path("/proc").glob("[0-9]*/ns/net"):
        with contextlib.suppress(OSError):
            if ns.stat().st_ino == inode:
                return True
    return False


def _kill_qemus(root: Path) -> None:
    """SIGKILL every QEMU of `root`, and wait (bounded) until they are gone: until then their
    namespaces still count as in use."""
    pids = qemu_pids_under(root)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if not any(Path(f"/proc/{pid}/ns/net").exists() for pid in pids):
            return
        time.sleep(0.05)
