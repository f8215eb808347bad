"""`mvm serve` in its default mode (one host + two edge workers) as its own process, with real guests:
what its supervisor does when a child is killed, when a second `mvm serve` starts on the same state
directory, and on SIGTERM with a request in flight and on_shutdown = "suspend".
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson

from tests.e2e.fleet_harness import DOMAIN, Role, ServedRole, free_port, toml
from tests.e2e.guest import guest_state, pid_alive
from tests.e2e.test_crash_safety import qemus_of
from tests.e2e.test_fleet import FAST, HOST, _until_hosts_up
from tests.e2e.test_hostile_clients import _guest_connections
from vmm.manager import VmManager
from vmm.model import VmState
from vmm.settings import VmmSettings


class Serve(ServedRole):
    """A running `mvm serve` (supervisor pid, its children by role, its JSON log) and a client of its port."""

    def children(self, role: str) -> list[int]:
        """Live (not zombie) child processes of the supervisor running `mvm <role>`."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and role.encode() in argv and pid_alive(int(entry.name)):
                found.append(int(entry.name))
        return sorted(found)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in _log_events(self.role.log) if e.get("event") == name]

    async def vm_with_token(self) -> tuple[str, str]:
        vm = await self.api("POST", "/v1/vms", {}, status=201)
        token = await self.api("POST", f"/v1/vms/{vm['id']}/tokens", {}, status=201)
        return str(vm["id"]), str(token["token"])


def _log_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_bytes().splitlines():
        if line.startswith(b"{"):
            events.append(orjson.loads(line))
    return events


def _config(settings: VmmSettings, tmp: Path, name: str, port: int, **vmm: Any) -> Path:
    config = tmp / f"{name}.toml"
    config.write_text(toml({
        "server": {"listen_port": port, "tls": False, "workers": 2, "drain_timeout": 10.0},
        "vmm": {"state_dir": str(settings.state_dir), **vmm},
        "cluster": {"host_listen": "127.0.0.1:0", "data_listen": "127.0.0.1:0", **FAST},
        "reaper": {"interval": 0.2},
    }))  # fmt: skip
    return config


@asynccontextmanager
async def serve(settings: VmmSettings, tmp: Path, **vmm: Any) -> AsyncIterator[Serve]:
    """`mvm serve --workers 2` until its host is up; stopped (and its children checked gone) at the end."""
    port = free_port()
    role = Role("serve", ["serve"], _config(settings, tmp, "serve", port, **vmm), tmp / "serve.log")
    await role.start()
    served = Serve(role, port)
    try:
        await served.until_up()
        await _until_hosts_up(served, {HOST})
        yield served
    finally:
        await role.stop()


async def _until(check: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.1)


async def test_a_killed_edge_worker_is_restarted_and_traffic_goes_on(settings: VmmSettings, tmp_path: Path) -> None:
    async with serve(settings, tmp_path) as served:
        vm_id, token = await served.vm_with_token()
        assert await served.counter(vm_id, token) == 1
        workers = served.children("edge")
        assert len(workers) == 2
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        await _until(lambda: any(e["previous_pid"] == victim for e in served.events("fleet.worker_restarted")))
        restarted = next(e for e in served.events("fleet.worker_restarted") if e["previous_pid"] == victim)
        assert restarted["status"] == -signal.SIGKILL and restarted["signal"] == "SIGKILL"
        assert restarted["restarts"] == 1
        await _until(lambda: len(served.children("edge")) == 2)
        now = served.children("edge")
        assert victim not in now and restarted["pid"] in now and workers[1] in now
        assert not Path(f"/proc/{victim}").exists(), "the killed worker was reaped, not left a zombie"
        for expected in range(2, 22):  # spread over both workers by the kernel (SO_REUSEPORT)
            assert await served.counter(vm_id, token) == expected
        await served.api("DELETE", f"/v1/vms/{vm_id}", status=204)
        await served.role.stop()
        assert served.proc.returncode == 0


async def test_edge_workers_give_up_root_and_reach_guests_through_the_host(
    settings: VmmSettings, tmp_path: Path
) -> None:
    worker_user = pwd.getpwnam("mvm-edge")
    async with serve(settings, tmp_path) as served:
        vm_id, token = await served.vm_with_token()
        for expected in range(1, 5):  # new upstream connections on both workers, each made by the host
            assert await served.counter(vm_id, token) == expected
        for pid in served.children("edge"):
            status = _status(pid)
            assert status["Uid"].split() == [str(worker_user.pw_uid)] * 4
            assert status["Gid"].split() == [str(worker_user.pw_gid)] * 4
            assert status["Groups"] == "" and status["NoNewPrivs"] == "1"
            assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
        (host,) = served.children("host")
        assert _status(host)["Uid"].split()[0] == "0", "the host keeps root: namespaces, QEMU, cgroups"
        started = served.events("edge.worker_started")
        assert started and {e["upstreams"] for e in started} == {"broker"}
        assert {e["uid"] for e in started} == {worker_user.pw_uid}
        await served.api("DELETE", f"/v1/vms/{vm_id}", status=204)


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


async def test_a_killed_host_stops_the_whole_set(settings: VmmSettings, tmp_path: Path) -> None:
    async with serve(settings, tmp_path) as served:
        vm_id, token = await served.vm_with_token()
        assert await served.counter(vm_id, token) == 1
        (host,) = served.children("host")
        workers = served.children("edge")
        os.kill(host, signal.SIGKILL)
        status = await asyncio.wait_for(served.proc.wait(), 60)
        assert status == 128 + signal.SIGKILL, "the set stops with a non-zero status"
        assert not any(pid_alive(pid) for pid in [host, *workers]), "no child is left"
        assert served.events("fleet.host_exited")[0]["signal"] == "SIGKILL"
        assert not served.events("fleet.worker_restarted")
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", served.port)) != 0, "nothing listens on the port any more"


async def test_a_second_serve_on_the_same_state_directory_is_refused_before_it_opens_its_port(
    settings: VmmSettings, tmp_path: Path
) -> None:
    async with serve(settings, tmp_path) as first:
        port = free_port()
        second = Role("second", ["serve"], _config(settings, tmp_path, "second", port), tmp_path / "second.log")
        await second.start()
        assert second.proc is not None
        assert await asyncio.wait_for(second.proc.wait(), 60) == 1
        lines = second.log.read_text().splitlines()
        assert lines == [
            f"mvm: error: state directory {settings.state_dir} is in use by pid {first.proc.pid} "
            "(is `mvm serve` already running?); one manager per state directory"
        ], "one line naming the directory and its holder, and nothing was started"
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, "no listener was opened on its port"
        status, _, _ = await first.request(f"api.{DOMAIN}", "GET", "/healthz")
        assert status == 200, "the first serve answers on"
        assert len(first.children("edge")) == 2 and len(first.children("host")) == 1


async def test_sigterm_answers_the_request_in_flight_before_the_host_suspends(
    settings: VmmSettings, tmp_path: Path
) -> None:
    async with serve(settings, tmp_path, on_shutdown="suspend") as served:
        vm_id, token = await served.vm_with_token()
        before = await guest_state(vm_id)  # from inside its namespace: no edge holds a guest connection yet
        await _until(lambda: _guest_connections(vm_id) == 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(f"GET /slow?ms=6000 HTTP/1.1\r\nHost: {vm_id}.{DOMAIN}\r\nAuthorization: Bearer {token}\r\n"
                     "Connection: close\r\n\r\n".encode())  # fmt: skip
        await _until(lambda: _guest_connections(vm_id) == 1)  # the request is at the guest
        served.proc.send_signal(signal.SIGTERM)
        answer = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert orjson.loads(answer.partition(b"\r\n\r\n")[2]) == {"slept_ms": 6000}
        assert await asyncio.wait_for(served.proc.wait(), 90) == 0
    assert qemus_of(vm_id) == [], "on_shutdown = suspend left no VM running"
    order = [e["event"] for e in _log_events(served.role.log) if e["event"] in ("edge.worker_stopped", "vm.suspended")]
    assert order == ["edge.worker_stopped", "edge.worker_stopped", "vm.suspended"], "edges drained, then the suspend"
    manager = VmManager(settings)
    await manager.start()
    try:
        assert manager.get(vm_id).state is VmState.SUSPENDED
        await manager.ensure_running(vm_id)
        after = await guest_state(vm_id)
        assert after["counter"] == before["counter"] + 1 and after["boot_id"] == before["boot_id"], "memory intact"
    finally:
        for rec in list(manager.list_vms()):
            await manager.delete(rec.id)
        await manager.close()
