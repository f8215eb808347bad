"""One VM as the manager holds it while it exists: its record plus what runs it."""

from __future__ import annotations

import asyncio

from . import qmp as qmp_ops
from .agent import Agent
from .applog import AppLog
from .console import ConsoleReader
from .model import VmRecord
from .qemu import QemuProcess


class LiveVm:
    """Runtime companions of one VM record: its QEMU, QMP connection and lock."""

    def __init__(self, rec: VmRecord) -> None:
        self.rec = rec
        self.proc: QemuProcess | None = None
        self.qmp: qmp_ops.Qmp | None = None
        self.lock = asyncio.Lock()  # serialises the VM's transitions
        self.expect_exit = False
        self.guest_ran = False  # its QEMU was sent `cont`: the guest writes to the RAM its snapshot was loaded over
        self.agent: Agent | None = None  # disk images only
        self.console: ConsoleReader | None = None  # disk images only: the app's stdout and stderr
        # The log QEMU appends to itself, once the manager has looked for it: checked ten times a
        # second, so its path is not worked out again each time.
        self.self_appended_log: AppLog | None = None
        self.moving = False  # its files are being copied to another host: no wake until that ends
