"""The `fork` hook: found in an image's fork.d, run through the guest agent with the parent's id."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from vmm.agent import ExecEvent
from vmm.hook_runner import run_hook
from vmm.hooks import Hooks, from_image
from vmm.live import LiveVm
from vmm.model import Template, VmRecord, VmState
from vmm.policy import Policy


class _Exec:
    finished = True

    async def __aiter__(self) -> AsyncIterator[ExecEvent]:
        yield ExecEvent("stdout", b"child of vparent\n")
        yield ExecEvent("exit", code=0)


class _Agent:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str]]] = []

    async def exec(self, argv: list[str], env: list[str], *_: Any) -> _Exec:
        self.calls.append((argv, env))
        return _Exec()


def test_fork_d_executables_are_found_at_build(tmp_path: Path) -> None:
    hook = tmp_path / "etc/mvm/hooks/fork.d/10-reseed"
    hook.parent.mkdir(parents=True)
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    assert from_image({}, None, 8080, tmp_path).exec == frozenset({"fork"})
    assert "fork" in from_image({"mvm.hooks": "fork"}, None, 8080, tmp_path).http


async def test_the_fork_hook_gets_the_parents_id() -> None:
    rec = VmRecord("vchild", "t", VmState.RUNNING, Policy(), 8080, 0.0, 0.0)
    vm = LiveVm(rec)
    agent = _Agent()
    vm.agent = agent  # type: ignore[assignment]
    tpl = Template("t", "i", 512, 1, 8080, (), 0.0, "/nowhere", "", "tcg", hooks=Hooks(8080, exec=frozenset({"fork"})))
    await run_hook(vm, tpl, "fork", b"{}", ("MVM_PARENT=vparent", "MVM_FORK_INDEX=0"))
    await run_hook(vm, tpl, "run", b"{}")  # not the image's: nothing runs
    assert agent.calls == [(["/mvm/init", "hooks", "fork"], ["MVM_PARENT=vparent", "MVM_FORK_INDEX=0"])]
