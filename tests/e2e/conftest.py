"""End-to-end fixtures: real QEMU guests from the project's own image, one template per run.

The image is built by scripts/install.sh into var/images. The template is booted once per
test session; every test gets its own state directory (sharing the template read-only)
and a finaliser that removes every VM, namespace, process and file it made.

The suite can run on two workers (`bash scripts/test.sh -n 2`), and other runs may share the
machine. Every test holds the machine lock shared; a module marked `exclusive` (it looks at the
whole machine: every namespace, every control directory in /tmp) holds it alone, so no other
worker or run starts anything meanwhile. A session
or module fixture that makes a namespace (a template boot, a shared VM) takes `machine()` while it
makes it: it is set up before the test's own lock is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
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
MACHINE_LOCK = Path("/tmp/mvm-e2e-machine.lock")
TURNSTILE = Path("/tmp/mvm-e2e-machine.turn")  # an exclusive waiter holds it: no new shared holder jumps ahead
# A session template that fails fails every test that uses it: its boot gets as long as the flask-app's
# (test_real_apps.py) on a machine busy with other runs. A boot that is ready sooner is not held.
BOOT_TIMEOUT = 240.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@contextlib.contextmanager
def machine(exclusive: bool = False) -> Iterator[None]:
    """The machine lock (flock, across workers and runs): shared, or alone for an `exclusive` test."""
    with TURNSTILE.open("a") as turn, MACHINE_LOCK.open("a") as lock:
        fcntl.flock(turn, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(turn, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(turn, fcntl.LOCK_UN)


def _exclusive(node: pytest.Item | pytest.Collector) -> bool:
    return node.get_closest_marker("exclusive") is not None


@pytest.fixture(scope="module", autouse=True)
def _machine_alone(request: pytest.FixtureRequest) -> Iterator[None]:
    """An `exclusive` module holds the machine lock alone from its first test to its last (one wait, not one
    per test)."""
    if not _exclusive(request.node):
        yield
        return
    with machine(exclusive=True):
        yield


@pytest.fixture(autouse=True)
def _machine_shared(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every other e2e test holds it shared, set-up and teardown included, before its own fixtures."""
    if _exclusive(request.node):
        yield
        return
    with machine():
        yield


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
    settings = VmmSettings(state_dir=session_root / "base", boot_timeout=BOOT_TIMEOUT)
    settings.state_dir.mkdir()
    (settings.state_dir / "images").symlink_to(IMAGES)
    with machine():  # its boot makes a namespace: not while an exclusive test looks
        uvloop.run(create_template(settings, "demo", "demo", choose(settings.accelerator), lambda _: None))
    return settings.templates_dir


@pytest.fixture(scope="session")
def sandbox_template(session_root: Path, template_dir: Path) -> str:
    """The python-sandbox image (a Dockerfile, built by scripts/install.sh) as template 'sandbox'."""
    if not (IMAGES / SANDBOX_IMAGE / "image.json").exists():
        pytest.fail(f"guest image {SANDBOX_IMAGE} missing: run scripts/install.sh (builds var/images/{SANDBOX_IMAGE})")
    settings = VmmSettings(state_dir=session_root / "base", boot_timeout=BOOT_TIMEOUT)
    with machine():
        uvloop.run(create_template(settings, "sandbox", SANDBOX_IMAGE, choose(settings.accelerator), lambda _: None))
    return "sandbox"


@pytest.fixture
def settings(session_root: Path, template_dir: Path, request: pytest.FixtureRequest) -> Iterator[VmmSettings]:
    """A fresh state dir per test, sharing images and templates; cleaned up whatever happens."""
    with state_settings(session_root, template_dir) as settings:
        yield settings


@pytest.fixture(scope="module")
def module_settings(session_root: Path, template_dir: Path) -> Iterator[VmmSettings]:
    """As `settings`, for the tests of one module that share one edge and its VMs."""
    with state_settings(session_root, template_dir) as settings:
        yield settings


@contextlib.contextmanager
def state_settings(session_root: Path, template_dir: Path) -> Iterator[VmmSettings]:
    """A fresh state dir sharing images and templates; its VMs, namespaces and files go at the end."""
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
        for name in leaked if not others_make_namespaces() else ():  # theirs would be new here too
            if not in_use(name):  # one with a live QEMU in it belongs to a test of another run, started meanwhile
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


_MAKERS = (b"pytest", b"-m\0bench.", b"/mvm\0serve", b"/mvm\0host")  # command lines that make VM namespaces


def others_make_namespaces() -> bool:
    """Whether another pytest, bench or manager runs on this machine: namespaces made meanwhile may be its.

    A namespace being made holds no process until its QEMU starts, so "not in use" alone would let this
    run's sweep delete it under a bench's or a server's create. This run's own ancestors (a `timeout ...
    pytest` wrapper) and descendants (the `mvm serve` a test starts) do not count; the other workers of a
    `pytest -n 2` run do (their command lines do not say pytest).
    """
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        return True
    parents: dict[int, int] = {}
    pytests: list[int] = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
            if any(maker in cmdline for maker in _MAKERS):
                pytests.append(int(proc.name))

    def line(pid: int) -> set[int]:
        seen = set()
        while pid > 1 and pid not in seen:
            seen.add(pid)
            pid = parents.get(pid, 0)
        return seen

    mine = line(os.getpid())
    return any(pid not in mine and os.getpid() not in line(pid) for pid in pytests)


def in_use(namespace: str) -> bool:
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
