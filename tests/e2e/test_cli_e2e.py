"""The `mvm` CLI against a running edge with real guests: the commands and their errors."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from tests.e2e.edge_harness import edge_config, running_edge
from vmm.settings import VmmSettings


async def mvm(config: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mvm.cli", *args, "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def mvm_json(config: Path, *args: str) -> Any:
    code, out, err = await mvm(config, *args)
    assert code == 0, err
    return json.loads(out)


async def test_cli_drives_the_control_api(settings: VmmSettings, tmp_path: Path) -> None:
    cfg = edge_config(settings)
    async with running_edge(cfg) as client:
        config = tmp_path / "cli.toml"
        config.write_text(
            f'[server]\nlisten_port = {client.edge.port}\ntls_cert = "{cfg.server.tls_cert}"\n'
            f'tls_key = "{cfg.server.tls_key}"\n[vmm]\nstate_dir = "{settings.state_dir}"\n'
        )
        vm = await mvm_json(config, "vm", "create", "--policy", '{"idle_suspend_after": 120}')
        assert vm["state"] == "running" and vm["policy"]["idle_suspend_after"] == 120
        code, listing, _ = await mvm(config, "vm", "ls")
        assert code == 0 and vm["id"] in listing and "running" in listing
        token = await mvm_json(config, "token", vm["id"], "--ttl", "60")
        assert 55 <= token["expires_in"] <= 61  # exp is rounded up to a whole second
        assert (await client.get_json(vm["id"], token["token"]))["counter"] == 1
        assert (await mvm_json(config, "vm", "suspend", vm["id"]))["state"] == "suspended"
        assert (await mvm_json(config, "vm", "resume", vm["id"]))["state"] == "running"
        assert (await client.get_json(vm["id"], token["token"]))["counter"] == 2
        code, _, err = await mvm(config, "logs", vm["id"], "--tail", "100")
        assert code == 0, err
        code, _, err = await mvm(config, "template", "rm", "demo")
        assert code == 1 and "HTTP 409" in err and vm["id"] in err and "Traceback" not in err
        code, listing, err = await mvm(config, "image", "ls")
        assert code == 0 and "demo" in listing and "initramfs" in listing, err
        code, _, err = await mvm(config, "image", "rm", "demo")
        assert code == 1 and "in use by template(s) demo" in err and "Traceback" not in err
        code, _, err = await mvm(config, "image", "build", "--dockerfile", str(tmp_path / "nope" / "Dockerfile"))
        assert code == 1 and "Dockerfile not found" in err and "Traceback" not in err
        code, _, err = await mvm(config, "image", "import", str(tmp_path / "nope.tar"))
        assert code == 1 and "archive not found" in err and "Traceback" not in err
        code, _, err = await mvm(config, "vm", "rm", vm["id"])
        assert code == 0, err
        code, out, err = await mvm(config, "vm", "get", vm["id"])
        assert code == 0 and '"terminated"' in out, "a deleted VM's record stays visible for a while"
        code, _, err = await mvm(config, "vm", "rm", vm["id"])
        assert code == 1 and "HTTP 404" in err and "Traceback" not in err
        code, _, err = await mvm(config, "vm", "create", "--policy", '{"vcpus": 0}')
        assert code == 1 and "policy.vcpus" in err and "Traceback" not in err
        code, _, err = await mvm(config, "vm", "create", "--policy", "{oops")
        assert code == 1 and "--policy is not valid JSON" in err


async def test_cli_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten_port = "x"\n')
    code, _, err = await mvm(bad, "vm", "ls")
    assert code == 1 and "server.listen_port" in err and "Traceback" not in err
    down = tmp_path / "down.toml"
    down.write_text(f'[server]\nlisten_port = 9\ntls = false\n[vmm]\nstate_dir = "{tmp_path}"\n')
    code, _, err = await mvm(down, "vm", "ls")
    assert code == 1 and "is `mvm serve` running?" in err and "Traceback" not in err
