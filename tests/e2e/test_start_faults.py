"""A start that fails at any step leaves nothing of it behind: `mvm serve` in one process, `mvm host`
and an edge worker.

Each named step (`start` in edge/app.py, fleet/host.py, fleet/edge_node.py) is made to fail in turn:
afterwards its ports are free, no QEMU or namespace of the run is left, the control socket's
directory is gone and the state directory's lock is free again (the next start works).
"""

from __future__ import annotations

import socket
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from edge import app
from fleet import edge_node, host
from mvm.config import Config, load_config
from tests.e2e.fleet_harness import free_port
from tests.e2e.guest import qemu_pids_under
from vmm import faults
from vmm.network import netns
from vmm.settings import VmmSettings

# It compares every namespace and control directory on the machine before and after: no other test runs meanwhile
# (the module holds the machine lock alone; tests/workers.py keeps it on one worker).
pytestmark = pytest.mark.exclusive

SERVE_STEPS = ("serve.listening", "serve.manager", "serve.control", "serve.serving")
HOST_STEPS = ("host.catalog", "host.manager", "host.api", "host.data_port", "host.serving")
EDGE_STEPS = ("edge.listening", "edge.routes", "edge.control", "edge.serving")


def _control_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("mvm-*control-*")}


def _config(settings: VmmSettings) -> Config:
    base = load_config(None)
    return replace(
        base,
        vmm=settings,
        server=replace(base.server, listen_port=free_port(), tls=False),
        cluster=replace(base.cluster, host_listen=f"127.0.0.1:{free_port()}", data_listen=f"127.0.0.1:{free_port()}"),
    )


def _ports(cfg: Config) -> list[int]:
    return [
        cfg.server.listen_port,
        *(int(a.rpartition(":")[2]) for a in (cfg.cluster.host_listen, cfg.cluster.data_listen)),
    ]


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize(
    ("role", "step"),
    [("serve", step) for step in SERVE_STEPS]
    + [("host", step) for step in HOST_STEPS]
    + [("edge", step) for step in EDGE_STEPS],
)
async def test_a_start_that_fails_at_a_step_leaves_nothing(settings: VmmSettings, role: str, step: str) -> None:
    cfg = _config(settings)
    start, stop = {"serve": (app.start, app.stop), "host": (host.start, host.stop),
                   "edge": (edge_node.start, edge_node.stop)}[role]  # fmt: skip
    namespaces, control_dirs = set(netns.list_project_namespaces()), _control_dirs()
    faults.arm(step, "raise")
    try:
        with pytest.raises(faults.FaultInjected, match=step):
            await start(cfg)
    finally:
        faults.disarm_all()
    assert all(_port_free(port) for port in _ports(cfg)), "every listener is closed"
    assert not qemu_pids_under(settings.state_dir)
    assert set(netns.list_project_namespaces()) <= namespaces
    assert _control_dirs() <= control_dirs, "the control socket's directory is removed"
    started = await start(cfg)  # the state directory's lock was let go
    await stop(started)
