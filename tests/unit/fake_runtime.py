"""A Runtime (vmm.runtime) with no QEMU and no namespaces, for the manager's unit tests.

It keeps what a real one would hold (guests and their run state, namespaces, cut routes,
egress listeners) as sets and dicts the tests read, and fails a named step on request.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

import orjson

from vmm import snapshot_check
from vmm.applog import AppLog
from vmm.cgroups import GroupUsage
from vmm.errors import VmFailed, VmmError
from vmm.live import LiveVm
from vmm.model import Template
from vmm.phases import Phases
from vmm.qemu import RamBacking
from vmm.runtime import OnLost
from vmm.settings import VmmSettings


class FakeRuntime:
    """Runtime over dicts: `guests` maps a VM id to its guest's run state ("paused" or "running")."""

    def __init__(self, settings: VmmSettings) -> None:
        self.settings = settings
        self.guests: dict[str, str] = {}
        self.networks: set[str] = set()
        self.cut_off: set[str] = set()
        self.cuts: list[str] = []  # every cut, in order
        self.egress: set[str] = set()
        self.adoptable: dict[str, str] = {}  # VM id -> the run state a QEMU left by an earlier manager reports
        self.fail: set[str] = set()  # steps that raise: "load.launch", "load.restore", "load.ram-move", "save", ...
        self.dies_on_failed_save = False  # a failing save takes the QEMU with it (SIGBUS on a full disk)
        self._on_lost: dict[str, OnLost] = {}
        self.groups: dict[str, GroupUsage] = {}  # VM id -> its cgroup's counters
        self.swept: list[set[str]] = []  # the `gone` of every cgroup sweep, in order
        self.taps: dict[str, tuple[int, int]] = {}  # VM id -> its tap's (rx, tx) bytes
        self.loads: list[tuple[str, str]] = []  # (purpose, VM id) of every load, in order
        self.load_gate: asyncio.Event | None = None  # when set, a restore's load waits for it

    def _step(self, name: str) -> None:
        if name in self.fail:
            raise VmmError(f"fake runtime: {name} failed")

    async def load(
        self, vm: LiveVm, tpl: Template, ram: RamBacking, snapshot: Path, ignore_shared: bool, purpose: str,
        on_lost: OnLost, phases: Phases | None = None,
    ) -> None:  # fmt: skip
        vm.expect_exit = vm.guest_ran = False
        self.loads.append((purpose, vm.rec.id))
        if purpose == "restore" and self.load_gate is not None:
            await self.load_gate.wait()
        if purpose != "ram-move":
            vm.rec.pid = fake_pid(vm.rec.id)
        self.guests[vm.rec.id] = "paused"
        self._on_lost[vm.rec.id] = on_lost
        self._step(f"load.{purpose}")

    async def command(self, vm: LiveVm, command: str) -> None:
        if vm.rec.id not in self.guests:
            raise VmFailed(f"VM {vm.rec.id} has no running QEMU")
        self._step(command)
        self.guests[vm.rec.id] = "running" if command == "cont" else "paused"

    async def save(self, vm: LiveVm, path: Path, ignore_shared: bool) -> int:
        if "save" in self.fail:
            if self.dies_on_failed_save:
                self.guests.pop(vm.rec.id, None)
            raise VmmError("fake runtime: save failed")
        path.write_bytes(b"device state" if ignore_shared else b"device state and RAM")
        snapshot_check.write(path, snapshot_check.file_digest(path))
        return path.stat().st_size

    async def stop(self, vm: LiveVm, why: str = "the VM's QEMU stopped") -> None:
        vm.expect_exit = True
        self._step("stop")
        self.guests.pop(vm.rec.id, None)
        vm.rec.pid = None

    async def let_go(self, vm: LiveVm) -> None:
        pass

    def alive(self, vm: LiveVm) -> bool:
        return vm.rec.id in self.guests

    def exit_reason(self, vm: LiveVm, during: str = "") -> str:
        return f"killed by the test{during}"

    async def guest_runs(self, vm: LiveVm) -> bool:
        return self.guests.get(vm.rec.id) == "running"

    async def open_console(self, vm: LiveVm, app_log: AppLog) -> None:
        pass

    async def connect_agent(self, vm: LiveVm) -> None:
        pass

    async def sync_guest(self, vm: LiveVm) -> None:
        pass

    def private_dirty(self, vm: LiveVm, mapped: Path) -> int:
        return 0

    def group_usage(self, vm_id: str) -> GroupUsage | None:
        return self.groups.get(vm_id)

    def tap_bytes(self, vm_id: str) -> tuple[int, int] | None:
        return self.taps.get(vm_id)

    def running_qemus(self) -> dict[str, list[int]]:
        return {f"mvm-{vm_id}": [fake_pid(vm_id)] for vm_id in self.adoptable}

    async def kill_strays(self, vm_id: str, keep: int | None, found: list[int]) -> None:
        pass

    async def adopt(self, vm: LiveVm, pid: int, on_lost: OnLost) -> str | None:
        state = self.adoptable.pop(vm.rec.id, None)
        if state is not None:
            self.guests[vm.rec.id] = state
            self._on_lost[vm.rec.id] = on_lost
        return state

    async def provision(self, vm: LiveVm, tpl: Template) -> None:
        self._step("create_network")
        self.networks.add(vm.rec.id)

    def network_exists(self, vm_id: str) -> bool:
        return vm_id in self.networks

    async def delete_network(self, vm_id: str) -> None:
        self.networks.discard(vm_id)
        self.cut_off.discard(vm_id)

    async def cut(self, vm_id: str) -> None:
        self.cuts.append(vm_id)
        if vm_id in self.networks:
            self.cut_off.add(vm_id)

    async def uncut(self, vm_id: str) -> None:
        self.cut_off.discard(vm_id)

    async def open_egress(self, vm: LiveVm) -> None:
        self.egress.add(vm.rec.id)

    async def close_egress(self, vm_id: str) -> None:
        self.egress.discard(vm_id)

    def prepare_confinement(self) -> None:
        self._step("prepare_confinement")

    async def release_confinement(self, vm_id: str) -> None:
        self._step("release_confinement")

    async def balance_cpu_forever(self) -> None:
        """Nothing to balance: fake VMs use no CPU."""

    def release_group(self, vm_id: str) -> None:
        self.groups.pop(vm_id, None)

    async def sweep_groups(self, gone: Iterable[str]) -> None:
        self.swept.append(set(gone))

    async def kill(self, vm: LiveVm) -> None:
        """The VM's QEMU ends unasked (as a pidfd would report it): settled under the VM's lock."""
        self.guests.pop(vm.rec.id, None)
        async with vm.lock:
            if not vm.expect_exit:
                await self._on_lost[vm.rec.id](vm, "killed by the test")


def fake_pid(vm_id: str) -> int:
    """The pid the fake QEMU of a VM has (never a real process of this test: nothing signals it)."""
    return 1 << 30 | zlib.crc32(vm_id.encode()) >> 2


def write_template(settings: VmmSettings, name: str = "demo") -> None:
    """A template on disk as vmm.template.load reads it (no RAM or disk behind it)."""
    path = settings.templates_dir / name
    path.mkdir(parents=True)
    (path / "ram").write_bytes(b"")
    meta = {
        "name": name, "image": "demo", "memory_mb": 16, "vcpus": 1, "app_port": 8080, "ports": [8080],
        "created_at": time.time(), "cmdline": "", "accelerator": "tcg",
    }  # fmt: skip
    (path / "template.json").write_bytes(orjson.dumps(meta))
