"""A start of `mvm serve` (one process) that fails at any step leaves nothing of it behind.

Each named step (edge/app.py `start`) is made to fail in turn: afterwards the port is free, no
QEMU or namespace of the run is left, the control socket's directory is gone and the state
directory's lock is free again (a second start works).
"""

from __future__ import annotations

import socket
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from edge.app import start, stop
from edge.config import load_config
from tests.e2e.fleet_harness import free_port
from tests.e2e.guest import qemu_pids_under
from vmm import faults, netns
from vmm.settings import VmmSettings

STEPS = ("serve.listening", "serve.manager", "serve.control", "serve.serving")


def _control_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("mvm-control-*")}


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("step", STEPS)
async def test_a_start_that_fails_at_a_step_leaves_nothing(settings: VmmSettings, step: str) -> None:
    base = load_config(None)
    cfg = replace(base, vmm=settings, server=replace(base.server, listen_port=free_port(), tls=False))
    namespaces, control_dirs = set(netns.list_project_namespaces()), _control_dirs()
    faults.arm(step, "raise")
    try:
        with pytest.raises(faults.FaultInjected, match=step):
            await start(cfg)
    finally:
        faults.disarm_all()
    assert _port_free(cfg.server.listen_port), "the listener is closed"
    assert not qemu_pids_under(settings.state_dir)
    assert set(netns.list_project_namespaces()) <= namespaces
    assert _control_dirs() <= control_dirs, "the control socket's directory is removed"
    edge = await start(cfg)  # the state directory's lock was let go
    await stop(edge)
