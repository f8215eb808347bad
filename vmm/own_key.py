"""A guest that wakes knowing another VM's agent key (a fork child, a clone of a session's template)
gets one of its own before its first request, with fresh entropy, in one sync (F_SYNC_REKEY)."""

from __future__ import annotations

import secrets
from pathlib import Path

from .agent import KEY_BYTES, AgentError, store_key
from .errors import VmFailed
from .jsonlog import log
from .live import LiveVm


async def take_own_key(vm: LiveVm, key_file: Path, timeout: float, known_by: str) -> None:
    """Sync `vm` once more with the restore's timeout and a new key, kept in `key_file` once the guest took
    it; a VM the sync fails for must not serve (it would share `known_by`'s RNG state), so it is ended. A
    guest agent from before keys could change (an image built earlier) refuses the new key: the VM keeps
    the one it woke with, and says so in the log."""
    if vm.agent is None or not timeout:
        return
    try:
        try:
            await vm.agent.sync(vm.rec.id, timeout, new_key=secrets.token_bytes(KEY_BYTES))
        except AgentError as refused:
            await vm.agent.sync(vm.rec.id, timeout)
            log.event("vm.rekey_refused", level="warning", vm=vm.rec.id, error=str(refused))
    except AgentError as exc:
        raise VmFailed(f"its guest agent took no fresh entropy (it would share {known_by}'s): {exc}") from exc
    store_key(key_file, vm.agent.key)
