"""The guest agent with real guests: snapshot-safe clones (entropy, clock, identity) and exec.

Every clone of a template wakes with the snapshot's RNG state and wall clock. The first test
shows what that means without the agent's sync (identical "random" bytes in two VMs, the
image's hostname, a stale clock); the others show the sync fixes it, and drive exec through
the edge's control API.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.e2e.conftest import started_manager
from tests.e2e.edge_harness import DOMAIN, Client, bearer, edge_config, running_edge
from tests.e2e.guest import guest_request, sandbox_run
from vmm.manager import VmManager
from vmm.settings import VmmSettings

REPO = Path(__file__).resolve().parents[2]
RANDOM = "import os, socket, time; (os.urandom(32).hex(), os.getrandom(32).hex(), socket.gethostname(), time.time())"


async def test_without_the_sync_clones_share_rng_state_and_a_stale_clock(
    settings: VmmSettings, sandbox_template: str
) -> None:
    """Why the sync exists: with it switched off, two clones draw the same "random" bytes."""
    mgr = VmManager(replace(settings, guest_sync=False))
    await mgr.start()
    try:
        first, second = [await mgr.create_vm(sandbox_template) for _ in range(2)]
        a, b = await sandbox_run(first.id, RANDOM), await sandbox_run(second.id, RANDOM)
        assert a[0] == b[0] and a[1] == b[1]  # /dev/urandom and getrandom(): the same bytes in both VMs
        assert a[2] == b[2] == "python-sandbox"  # the template's hostname, not the VM's id
        await mgr.suspend(first.id)
        await asyncio.sleep(3)
        await mgr.ensure_running(first.id)
        after = await sandbox_run(first.id, RANDOM)
        assert time.time() - after[3] > 2.5  # the guest's clock missed the time it was suspended
    finally:
        for vm in list(mgr.list_vms()):
            await mgr.delete(vm.id)
        await mgr.close()


async def test_clones_get_fresh_entropy_the_host_clock_and_their_own_hostname(
    settings: VmmSettings, sandbox_template: str
) -> None:
    mgr = VmManager(settings)
    await mgr.start()
    try:
        first, second = [await mgr.create_vm(sandbox_template) for _ in range(2)]
        a, b = await sandbox_run(first.id, RANDOM), await sandbox_run(second.id, RANDOM)
        assert a[0] != b[0] and a[1] != b[1]
        assert (a[2], b[2]) == (first.id, second.id)
        for pause in (30, 1):  # after every restore, not only the first; the first after a 30 s suspend
            await mgr.suspend(first.id)
            await asyncio.sleep(pause)
            before = time.time()
            await mgr.ensure_running(first.id)
            guest = await sandbox_run(first.id, RANDOM)
            assert before - 0.05 <= guest[3] <= time.time() + 0.05  # within 50 ms of the host's clock
            assert guest[2] == first.id
        # the agent only takes syncs and execs that carry this VM's key
        agent = mgr.records.get(first.id).agent
        assert agent is not None
        real, agent.key = agent.key, b"\x00" * 32
        refused = [event async for event in await agent.exec(["true"], [], "/", 0, 0)]
        assert refused[-1].kind == "error" and b"key" in refused[-1].data
        agent.key = real
        assert [e.kind async for e in await agent.exec(["true"], [], "/", 0, 0)] == ["exit"]
    finally:
        for vm in list(mgr.list_vms()):
            await mgr.delete(vm.id)
        await mgr.close()


async def _exec(client: Client, vm_id: str, body: dict[str, Any], status: int = 200) -> list[dict[str, Any]]:
    url = client.base.format(host=f"api.{DOMAIN}") + f"/v1/vms/{vm_id}/exec"
    async with client.session.post(url, json=body, headers=client.admin) as resp:
        assert resp.status == status, await resp.text()
        if status != 200:
            return [await resp.json()]
        return [orjson.loads(line) async for line in resp.content]


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def _stream_big_output(client: Client, vm_id: str, size: int) -> tuple[str, int, int]:
    """Read an exec's output line by line, hashing it, and note how far RSS rose meanwhile."""
    url = client.base.format(host=f"api.{DOMAIN}") + f"/v1/vms/{vm_id}/exec"
    body = {"argv": ["sh", "-c", f"head -c {size} /dev/zero | tr '\\0' 'x'"]}
    digest, received, base, peak = hashlib.sha256(), 0, _rss(), 0
    async with client.session.post(url, json=body, headers=client.admin) as resp:
        async for line in resp.content:
            event = orjson.loads(line)
            if event.get("stream") == "stdout":
                chunk = base64.b64decode(event["data"])
                digest.update(chunk)
                received += len(chunk)
                peak = max(peak, _rss() - base)
            elif "exit_code" in event:
                assert event == {"exit_code": 0}
    return digest.hexdigest(), received, peak


def _output(events: list[dict[str, Any]], stream: str) -> bytes:
    return b"".join(base64.b64decode(e["data"]) for e in events if e.get("stream") == stream)


async def test_exec_streams_output_exit_codes_stdin_and_timeouts(settings: VmmSettings, sandbox_template: str) -> None:
    async with running_edge(edge_config(settings)) as client:
        vm = await client.api("POST", "/v1/vms", {"template": sandbox_template}, status=201)
        vm_id = vm["id"]
        events = await _exec(client, vm_id, {"argv": ["sh", "-c", "echo out; echo err >&2; pwd; id -u"],
                                             "cwd": "/data", "user": "1000"})  # fmt: skip
        assert _output(events, "stdout") == b"out\n/data\n1000\n" and _output(events, "stderr") == b"err\n"
        assert events[-1] == {"exit_code": 0}
        assert (await _exec(client, vm_id, {"argv": ["false"]}))[-1] == {"exit_code": 1}
        killed = await _exec(client, vm_id, {"argv": ["sh", "-c", "kill -9 $$"]})
        assert killed[-1] == {"exit_code": 137, "signal": "SIGKILL"}
        missing = await _exec(client, vm_id, {"argv": ["no-such-binary"]})
        assert missing[-1] == {"exit_code": 127} and b"no-such-binary" in _output(missing, "stderr")
        piped = await _exec(client, vm_id, {"argv": ["sha256sum"], "stdin": "piped in\n", "env": {"X": "1"}})
        assert _output(piped, "stdout").split()[0].decode() == hashlib.sha256(b"piped in\n").hexdigest()
        slow = await _exec(client, vm_id, {"argv": ["sleep", "60"], "timeout": 1})
        assert slow[-1]["timed_out"] is True and "killed" in slow[-1]["error"]
        bad = await _exec(client, vm_id, {"argv": "ls"}, status=422)
        assert "argv must be a non-empty list" in bad[0]["message"]

        # 20 at once, each with its own output
        many = await asyncio.gather(*(_exec(client, vm_id, {"argv": ["echo", str(i)]}) for i in range(20)))
        assert [_output(events, "stdout") for events in many] == [f"{i}\n".encode() for i in range(20)]

        # 100 MiB of stdout, byte-exact and streamed: this process (edge and client both) never holds it whole
        digest, size, peak_growth = await _stream_big_output(client, vm_id, 100 * 2**20)
        assert size == 100 * 2**20 and digest == hashlib.sha256(b"x" * size).hexdigest()
        assert peak_growth < 48 * 2**20, f"RSS grew {peak_growth / 2**20:.0f} MiB while streaming 100 MiB"

        # exec wakes a suspended VM like a request does
        await client.api("POST", f"/v1/vms/{vm_id}/suspend", status=200)
        woke = await _exec(client, vm_id, {"argv": ["hostname"]})
        assert _output(woke, "stdout") == f"{vm_id}\n".encode()
        assert (await client.api("GET", f"/v1/vms/{vm_id}"))["state"] == "running"


async def test_exec_ends_with_an_error_when_its_vm_is_suspended(settings: VmmSettings, sandbox_template: str) -> None:
    async with running_edge(edge_config(settings)) as client:
        vm_id = (await client.api("POST", "/v1/vms", {"template": sandbox_template}, status=201))["id"]
        running = asyncio.create_task(_exec(client, vm_id, {"argv": ["sleep", "30"]}))
        async with asyncio.timeout(10):
            while client.edge.manager.busy_count(vm_id) == 0:
                await asyncio.sleep(0.05)
        await client.api("POST", f"/v1/vms/{vm_id}/suspend", status=200)
        events = await asyncio.wait_for(running, 10)
        assert "was suspended" in events[-1]["error"]


_SEEDED = (
    "import random, sys; r = random.Random(7); [sys.stdout.buffer.write(r.randbytes(1 << 16)) for _ in range(160)]"
)


async def _streams(manager: VmManager, vm_id: str, argv: list[str]) -> tuple[bytes, bytes, int]:
    stdout, stderr, code = bytearray(), bytearray(), -1
    async for event in await manager.exec(vm_id, argv, [], "/", 0, 0):
        if event.kind == "stdout":
            stdout += event.data
        elif event.kind == "stderr":
            stderr += event.data
        else:
            assert event.kind == "exit", event
            code = event.code
    return bytes(stdout), bytes(stderr), code


async def test_concurrent_execs_streams_arrive_whole_and_in_order(settings: VmmSettings, sandbox_template: str) -> None:
    """Several execs at once, big and small, on stdout and stderr: the agent splices some frames and copies
    others (output that comes while other frames wait for the port), and every stream arrives byte-exact."""
    seeded = random.Random(7)
    want = b"".join(seeded.randbytes(1 << 16) for _ in range(160))
    lines = "for i in $(seq 1 300); do echo out$i; echo err$i >&2; done"
    async with started_manager(settings) as manager:
        vm_id = (await manager.create_vm(sandbox_template)).id
        for _ in range(2):
            async with asyncio.timeout(180):
                got = await asyncio.gather(
                    _streams(manager, vm_id, ["python3", "-c", _SEEDED]),
                    _streams(
                        manager,
                        vm_id,
                        ["sh", "-c", "dd if=/dev/zero bs=1M count=20 status=none; head -c 3000000 /dev/zero >&2"],
                    ),
                    _streams(manager, vm_id, ["sh", "-c", lines]),
                    _streams(manager, vm_id, ["sh", "-c", "head -c 20000000 /dev/zero | tr '\\0' a"]),
                )
            assert got[0] == (want, b"", 0)
            assert got[1] == (bytes(20 << 20), bytes(3000000), 0)
            assert got[2] == (
                "".join(f"out{i}\n" for i in range(1, 301)).encode(),
                "".join(f"err{i}\n" for i in range(1, 301)).encode(),
                0,
            )
            assert got[3] == (b"a" * 20000000, b"", 0)


async def test_files_round_trip_any_size_list_and_atomic_overwrite(
    settings: VmmSettings, sandbox_template: str, tmp_path: Path
) -> None:
    async with running_edge(edge_config(settings)) as client:
        vm_id = (await client.api("POST", "/v1/vms", {"template": sandbox_template}, status=201))["id"]
        url = client.base.format(host=f"api.{DOMAIN}") + f"/v1/vms/{vm_id}/files"
        big = tmp_path / "big.bin"
        with open(big, "wb") as f:
            for _ in range(100):
                f.write(os.urandom(2**20))
        digest = hashlib.sha256(big.read_bytes()).hexdigest()
        with open(big, "rb") as f:
            async with client.session.put(url, params={"path": "/data/in/big.bin"}, data=f, headers=client.admin) as r:
                assert r.status == 201 and (await r.json())["bytes"] == 100 * 2**20
        back = hashlib.sha256()
        async with client.session.get(url, params={"path": "/data/in/big.bin"}, headers=client.admin) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_chunked(1 << 20):
                back.update(chunk)
        assert back.hexdigest() == digest

        # the app sees the file on its own disk, and an overwrite is atomic (temp file + rename)
        assert await sandbox_run(vm_id, "import os; os.path.getsize('/data/in/big.bin')") == 100 * 2**20
        inode = await sandbox_run(vm_id, "import os; os.stat('/data/in/big.bin').st_ino")
        async with client.session.put(url, params={"path": "/data/in/big.bin"}, data=b"small", headers=client.admin):
            pass
        assert await sandbox_run(vm_id, "open('/data/in/big.bin', 'rb').read()") == b"small"
        assert await sandbox_run(vm_id, "import os; os.stat('/data/in/big.bin').st_ino") != inode

        async with client.session.get(url, params={"path": "/data/in"}, headers=client.admin) as resp:
            listing = await resp.json()
        assert [(e["name"], e["type"], e["size"]) for e in listing["entries"]] == [("big.bin", "file", 5)]
        assert set(listing["entries"][0]) == {"name", "type", "size", "mode", "mtime"}

        async with client.session.get(url, params={"path": "/data/nope"}, headers=client.admin) as resp:
            assert resp.status == 404 and "No such file" in (await resp.json())["message"]
        async with client.session.get(url, params={"path": "relative"}, headers=client.admin) as resp:
            assert resp.status == 422
        async with client.session.delete(url, params={"path": "/data/in"}, headers=client.admin) as resp:
            assert resp.status == 409 and "not empty" in (await resp.json())["message"]
        async with client.session.delete(url, params={"path": "/data/in/big.bin"}, headers=client.admin) as resp:
            assert resp.status == 204
        assert await sandbox_run(vm_id, "import os; os.listdir('/data/in')") == []


async def test_cli_exec_and_cp(settings: VmmSettings, sandbox_template: str, tmp_path: Path) -> None:
    cfg = edge_config(settings)
    async with running_edge(cfg) as client:
        vm_id = (await client.api("POST", "/v1/vms", {"template": sandbox_template}, status=201))["id"]
        config = tmp_path / "cli.toml"
        config.write_text(f'[server]\nlisten_port = {client.edge.port}\ntls_cert = "{cfg.server.tls_cert}"\n'
                          f'tls_key = "{cfg.server.tls_key}"\n')  # fmt: skip

        async def mvm(*args: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mvm.cli", "--config", str(config), *args,  # exec's argv takes the rest
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
            assert proc.returncode is not None
            return proc.returncode, out, err

        code, out, err = await mvm("exec", vm_id, "--", "sh", "-c", "tr a-z A-Z; echo oops >&2; exit 7", stdin=b"abc\n")
        assert (code, out, err) == (7, b"ABC\n", b"oops\n")
        local = tmp_path / "notes.txt"
        local.write_bytes(b"copied in\n")
        code, out, err = await mvm("cp", str(local), f"{vm_id}:/data/notes.txt")
        assert code == 0, err
        code, _, err = await mvm("cp", f"{vm_id}:/data/notes.txt", str(tmp_path / "back.txt"))
        assert code == 0 and (tmp_path / "back.txt").read_bytes() == b"copied in\n", err
        code, _, err = await mvm("cp", f"{vm_id}:/data/missing", str(tmp_path / "x"))
        assert code == 1 and b"HTTP 404" in err and b"Traceback" not in err and not (tmp_path / "x").exists()
        code, _, err = await mvm("exec", vm_id)
        assert code == 1 and b"no command given" in err


async def test_sdk_example_runs_against_the_real_edge(settings: VmmSettings, sandbox_template: str) -> None:
    cfg = edge_config(settings)
    async with running_edge(cfg) as client:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(REPO / "examples" / "sandbox_agent.py"), "--url", f"https://127.0.0.1:{client.edge.port}",
            "--admin-key", cfg.server.admin_key, "--cafile", str(cfg.server.tls_cert), "--template", sandbox_template,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        lines = out.decode().splitlines()
        assert lines[0].startswith("step 0: exit 0: 2432902008176640000 v")  # the hostname is the VM's id
        assert lines[1:] == ["step 1: exit 0: ", "step 2: exit 3: 42", "files: ['answer.txt']"]
        assert client.edge.manager.list_vms() == []  # the example deleted its VM


async def test_sdk_errors_are_typed(settings: VmmSettings, sandbox_template: str) -> None:
    from microvm_edge import AsyncClient, InvalidRequest, NotFound, Unauthorized

    cfg = edge_config(settings)
    async with running_edge(cfg) as client:
        url = f"https://127.0.0.1:{client.edge.port}"
        async with AsyncClient(url, cfg.server.admin_key, cafile=str(cfg.server.tls_cert)) as sdk:
            with pytest.raises(NotFound) as missing:
                await sdk.get("vaaaaaaaaaaa")
            assert missing.value.code == "not_found" and missing.value.status == 404
            with pytest.raises(InvalidRequest, match=r"policy\.vcpus"):
                await sdk.create(template=sandbox_template, policy={"vcpus": 0})
            vm = await sdk.create(template=sandbox_template)
            events = [e async for e in sdk.exec(vm.id, ["sh", "-c", "echo a; echo b >&2"])]
            assert sorted((e.kind, e.data) for e in events[:-1]) == [("stderr", b"b\n"), ("stdout", b"a\n")]
            assert events[-1].exit_code == 0
        async with AsyncClient(url, "wrong-key-0123456789", cafile=str(cfg.server.tls_cert)) as bad:
            with pytest.raises(Unauthorized):
                await bad.list()


async def test_scoped_tokens_reach_the_agent_on_the_vms_own_host_and_ports_are_bounded(
    settings: VmmSettings, sandbox_template: str
) -> None:
    async with running_edge(edge_config(settings)) as client:
        vm_id = (await client.api("POST", "/v1/vms", {"template": sandbox_template}, status=201))["id"]

        async def token(**body: Any) -> str:
            return str((await client.api("POST", f"/v1/vms/{vm_id}/tokens", body, status=201))["token"])

        runner, plain = await token(scopes=["exec", "files"]), await token()
        exec_url = client.vm_url(vm_id, "/.mvm/exec")
        async with client.session.post(exec_url, json={"argv": ["hostname"]}, headers=bearer(runner)) as resp:
            assert resp.status == 200, await resp.text()
            events = [orjson.loads(line) async for line in resp.content]
        assert _output(events, "stdout") == f"{vm_id}\n".encode() and events[-1] == {"exit_code": 0}
        files_url = client.vm_url(vm_id, "/.mvm/files?path=/data/ide.txt")
        async with client.session.put(files_url, data=b"from the browser IDE", headers=bearer(runner)) as resp:
            assert resp.status == 201
        async with client.session.get(files_url + f"&token={runner}") as resp:  # a browser link works too
            assert resp.status == 200 and await resp.read() == b"from the browser IDE"

        # scopes: an exec token does not reach the app, an http token does not reach the agent
        async with client.session.get(client.vm_url(vm_id, "/"), headers=bearer(runner)) as resp:
            assert resp.status == 403 and "do not include http" in (await resp.json())["message"]
        async with client.session.post(exec_url, json={"argv": ["id"]}, headers=bearer(plain)) as resp:
            assert resp.status == 403 and "do not include exec" in (await resp.json())["message"]
        async with client.session.get(client.vm_url(vm_id, "/.mvm/shellz"), headers=bearer(runner)) as resp:
            assert resp.status == 404
        async with client.session.get(exec_url, headers=bearer(runner)) as resp:
            assert resp.status == 405
        # the app itself never sees /.mvm/ paths, whatever the token (it logs every request it serves)
        logs_url = client.base.format(host=f"api.{DOMAIN}") + f"/v1/vms/{vm_id}/logs?tail=100000"
        async with client.session.get(logs_url, headers=client.admin) as resp:
            app_log = await resp.text()
        assert "GET / HTTP/1.1" not in app_log and "/.mvm/" not in app_log

        # ports: within the VM's allow-list, a token may open fewer
        await client.api("POST", f"/v1/vms/{vm_id}/tokens", {"ports": "9000-8000"}, status=422)
        only_app = await token(ports="8080")
        async with client.session.get(client.vm_url(vm_id, "/healthz"), headers=bearer(only_app)) as resp:
            assert resp.status == 200
        async with client.session.get(client.vm_url(vm_id, "/", port=8081), headers=bearer(only_app)) as resp:
            assert resp.status == 403 and "does not open port 8081" in (await resp.json())["message"]


async def _read_until(ws: Any, needle: bytes, seen: bytearray, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while needle not in seen:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.BINARY, msg
            seen += msg.data


async def test_shell_over_a_websocket_with_resize_ctrl_c_and_exit_status(
    settings: VmmSettings, sandbox_template: str, tmp_path: Path
) -> None:
    cfg = edge_config(settings)
    async with running_edge(cfg) as client:
        vm_id = (await client.api("POST", "/v1/vms", {"template": sandbox_template}, status=201))["id"]
        token = (await client.api("POST", f"/v1/vms/{vm_id}/tokens", {"scopes": ["shell"]}, status=201))["token"]
        url = client.vm_url(vm_id, "/.mvm/shell?cols=80&rows=24")
        async with client.session.ws_connect(url, headers=bearer(token)) as ws:
            seen = bytearray()
            await ws.send_bytes(b"stty size; echo marker-$((6*7))\n")
            await _read_until(ws, b"marker-42", seen)
            assert b"24 80" in seen
            await ws.send_str(orjson.dumps({"resize": [100, 40]}).decode())
            await ws.send_bytes(b"stty size\n")
            await _read_until(ws, b"40 100", seen)
            await ws.send_bytes(b"sleep 100\n")
            await asyncio.sleep(0.5)
            await ws.send_bytes(b"\x03")  # Ctrl-C: the guest's tty interrupts the sleep
            await ws.send_bytes(b"echo after-$((1+1))\n")
            await _read_until(ws, b"after-2", seen)
            await ws.send_bytes(b"exit 5\n")
            async with asyncio.timeout(20):
                while (msg := await ws.receive()).type == aiohttp.WSMsgType.BINARY:
                    pass
            assert msg.type == aiohttp.WSMsgType.TEXT and orjson.loads(msg.data) == {"exit_code": 5}
        async with client.session.get(client.vm_url(vm_id, "/.mvm/shell"), headers=bearer(token)) as resp:
            assert resp.status == 200 and "new WebSocket" in await resp.text()  # the browser page

        # `mvm shell` with piped input: the commands run, Ctrl-D at the end of the input, the status is ours
        config = tmp_path / "cli.toml"
        config.write_text(f'[server]\nlisten_port = {client.edge.port}\ntls_cert = "{cfg.server.tls_cert}"\n'
                          f'tls_key = "{cfg.server.tls_key}"\n')  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mvm.cli", "--config", str(config), "shell", vm_id,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(b"echo via-$((2*21))\nexit 4\n"), 60)
        assert proc.returncode == 4 and b"via-42" in out, err


async def _count_in_guest(client: Client, vm_id: str, pattern: str) -> int:
    """How many guest processes' command lines match `pattern` (write it as "[s]leep" so it does not match itself)."""
    each = 'for p in /proc/[0-9]*; do tr "\\0" " " < $p/cmdline 2>/dev/null; echo; done'
    script = f'{each} | grep -c "{pattern}" || true'
    events = await _exec(client, vm_id, {"argv": ["sh", "-c", script]})
    return int(_output(events, "stdout").strip() or 0)


async def test_exec_faults_client_gone_agent_killed_and_the_reaper_waits(
    settings: VmmSettings, sandbox_template: str
) -> None:
    async with running_edge(edge_config(settings)) as client:
        body = {"template": sandbox_template, "policy": {"idle_suspend_after": 1}}
        vm_id = (await client.api("POST", "/v1/vms", body, status=201))["id"]
        url = client.base.format(host=f"api.{DOMAIN}") + f"/v1/vms/{vm_id}/exec"

        # a client that leaves mid-stream: the command (and its children) are killed
        started = {"argv": ["sh", "-c", "echo started; sleep 987; echo never"]}
        async with client.session.post(url, json=started, headers=client.admin) as resp:
            assert (await resp.content.readline()).startswith(b'{"stream":"stdout"')
            assert await _count_in_guest(client, vm_id, "[s]leep 987") >= 1  # the shell and its sleep
        async with asyncio.timeout(10):
            while await _count_in_guest(client, vm_id, "[s]leep 987"):
                await asyncio.sleep(0.2)

        # the idle reaper (1 s) leaves a VM alone while an exec runs in it
        events = await _exec(client, vm_id, {"argv": ["sleep", "4"]})
        assert events[-1] == {"exit_code": 0}
        assert (await client.api("GET", f"/v1/vms/{vm_id}"))["state"] == "running"

        # the agent killed inside the guest: its exec ends with an error, init restarts it, execs work again
        killed = await _exec(client, vm_id, {"argv": ["sh", "-c", "kill -9 $PPID; sleep 30"], "timeout": 5})
        assert "error" in killed[-1]
        async with asyncio.timeout(20):
            while True:
                again = await _exec(client, vm_id, {"argv": ["echo", "agent is back"], "timeout": 5})
                if _output(again, "stdout") == b"agent is back\n":
                    break
                await asyncio.sleep(0.5)
        assert "restarting it" in (await _logs_text(client, vm_id))


async def _logs_text(client: Client, vm_id: str) -> str:
    async with client.session.get(client.base.format(host=f"api.{DOMAIN}") + f"/v1/vms/{vm_id}/logs",
                                  headers=client.admin) as resp:  # fmt: skip
        return await resp.text()


async def test_sigterm_to_init_stops_the_app_cleanly_and_a_silent_agent_never_holds_a_wake(
    settings: VmmSettings, sandbox_template: str
) -> None:
    async with running_edge(edge_config(settings)) as client:
        bad = await client.api("POST", "/v1/vms/vnosuchvm2345/exec", {"argv": ["true"]}, status=404)
        assert "does not exist" in bad["message"]

        # an agent that stops answering (SIGSTOP): the restore goes on without it, within agent_timeout
        vm_id = (await client.api("POST", "/v1/vms", {"template": sandbox_template}, status=201))["id"]
        stopped = await _exec(client, vm_id, {"argv": ["sh", "-c", "kill -STOP $PPID; sleep 30"], "timeout": 2})
        assert stopped[-1].get("timed_out") is True
        await client.api("POST", f"/v1/vms/{vm_id}/suspend", status=200)
        started = time.monotonic()
        resumed = await client.api("POST", f"/v1/vms/{vm_id}/resume", status=200)
        assert resumed["state"] == "running" and time.monotonic() - started < 10
        status, _ = await guest_request(vm_id, "/healthz")
        assert status == 200  # the app serves, agent or not

        # SIGTERM to PID 1: the init forwards it to the app, which ends; the VM powers off and says why
        other = (await client.api("POST", "/v1/vms", {"template": sandbox_template}, status=201))["id"]
        sent = await _exec(client, other, {"argv": ["sh", "-c", "kill -TERM 1"]})
        assert sent[-1] == {"exit_code": 0}, sent
        async with asyncio.timeout(30):
            while (vm := await client.api("GET", f"/v1/vms/{other}"))["state"] != "failed":
                await asyncio.sleep(0.2)
        log = await _logs_text(client, other)
        assert "stopping: SIGTERM to the app" in log and "app (pid" in log, log[-2000:]
        assert "app (pid" in vm["reason"], vm["reason"]


async def _names(client: Client, vm_id: str, directory: str) -> list[str]:
    url = client.base.format(host=f"api.{DOMAIN}") + f"/v1/vms/{vm_id}/files"
    async with client.session.get(url, params={"path": directory}, headers=client.admin) as resp:
        assert resp.status == 200, await resp.text()
        return sorted(e["name"] for e in (await resp.json())["entries"])


async def test_files_time_out_on_a_silent_agent_and_a_cut_upload_leaves_no_file(
    settings: VmmSettings, sandbox_template: str
) -> None:
    async with running_edge(edge_config(settings)) as client:
        vm_id = (await client.api("POST", "/v1/vms", {"template": sandbox_template}, status=201))["id"]
        url = client.base.format(host=f"api.{DOMAIN}") + f"/v1/vms/{vm_id}/files"

        # an upload whose client goes away midway: never a named temporary file, before or after
        sent, go_on = asyncio.Event(), asyncio.Event()

        async def body() -> Any:
            for _ in range(4):
                yield b"u" * 2**20
            sent.set()
            await go_on.wait()

        upload = asyncio.create_task(client.session.put(url, params={"path": "/data/cut.bin"}, data=body(),
                                                        headers=client.admin))  # fmt: skip
        await asyncio.wait_for(sent.wait(), 60)
        assert await _names(client, vm_id, "/data") == []  # mid-upload: the bytes are in an unnamed file
        upload.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await upload
        async with asyncio.timeout(30):
            while client.edge.manager.busy_count(vm_id):  # the PUT handler has ended and killed file-put
                await asyncio.sleep(0.1)
        assert await _names(client, vm_id, "/data") == []

        # the agent frozen (SIGSTOP) until /data/continue appears: the files API answers 504, then nothing is left
        freeze = "kill -STOP $PPID; while [ ! -e /data/continue ]; do sleep 0.2; done; kill -CONT $PPID"
        frozen = await _exec(client, vm_id, {"argv": ["sh", "-c", freeze], "timeout": 1})
        assert frozen[-1].get("timed_out") is True
        expected = f"VM {vm_id}: the guest agent did not answer within the timeout of 1 s"
        async with client.session.get(url, params={"path": "/data", "timeout": "1"}, headers=client.admin) as resp:
            assert (resp.status, await resp.json()) == (504, {"error": "gateway_timeout", "message": expected})
        async with client.session.put(url, params={"path": "/data/frozen.bin", "timeout": "1"}, data=b"f" * 2**22,
                                      headers=client.admin) as resp:  # fmt: skip
            assert (resp.status, await resp.json()) == (504, {"error": "gateway_timeout", "message": expected})
        assert await sandbox_run(vm_id, "open('/data/continue', 'w').write('go')") == 2
        async with asyncio.timeout(60):
            while _output(await _exec(client, vm_id, {"argv": ["echo", "back"], "timeout": 5}), "stdout") != b"back\n":
                await asyncio.sleep(0.5)
        assert await _names(client, vm_id, "/data") == ["continue"]
