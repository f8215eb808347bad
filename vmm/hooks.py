"""Lifecycle hooks: what an image asks to be told about its VMs' lives.

An image declares its hooks with labels (or `mvm image build --hooks`):
- `mvm.hooks="run,resume,suspend,terminate,fork"`: HTTP hooks, each `POST <prefix>/<event>` on
  the hook port (`mvm.hooks.port`, default the app port; `mvm.hooks.prefix`, default /hooks);
- `ready` and `validate` gate template creation: the template is snapshotted only after
  `ready` answers 2xx (polled within the boot timeout) and `validate` answers 2xx once;
- executables in `/etc/mvm/hooks/<event>.d/` (run, resume, suspend, terminate, fork) are found at
  build time and run in the guest through the agent (`/mvm/init hooks <event>`);
- `fork` tells a forked child it is one (vmm.checkpoints): its body is {"parent", "checkpoint", "index"},
  and fork.d executables get MVM_PARENT, MVM_CHECKPOINT and MVM_FORK_INDEX; a child never gets `run`;
- `mvm.hooks.timeout` (default 10 s) and `mvm.hooks.<event>.timeout`, each within 1-60 s.
The `run` hook gets the VM's launch payload (`run_payload`, at most 16 KiB of JSON) as its body.
A lifecycle hook that fails or runs past its timeout is logged with its output and the step
goes on: a hook never holds a VM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from . import probe
from .errors import InvalidRequest, VmmError

LIFECYCLE = ("run", "resume", "suspend", "terminate", "fork")
GATES = ("ready", "validate")
EVENTS = LIFECYCLE + GATES
MAX_PAYLOAD = 16 * 1024
DEFAULT_TIMEOUT = 10.0
EXEC_DIR = "etc/mvm/hooks"


@dataclass(frozen=True)
class Hooks:
    port: int
    http: frozenset[str] = frozenset()
    exec: frozenset[str] = frozenset()  # events with executables in /etc/mvm/hooks/<event>.d
    prefix: str = "/hooks"
    timeouts: dict[str, float] = field(default_factory=dict)

    def has(self, event: str) -> bool:
        return event in self.http or event in self.exec

    def timeout(self, event: str) -> float:
        return self.timeouts.get(event, DEFAULT_TIMEOUT)

    def path(self, event: str) -> str:
        return f"{self.prefix}/{event}"

    def to_dict(self) -> dict[str, Any]:
        return {"port": self.port, "http": sorted(self.http), "exec": sorted(self.exec), "prefix": self.prefix,
                "timeouts": self.timeouts}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hooks:
        timeouts = {k: float(v) for k, v in data.get("timeouts", {}).items()}
        http, exec_events = frozenset(data.get("http", ())), frozenset(data.get("exec", ()))
        return cls(int(data["port"]), http, exec_events, str(data.get("prefix", "/hooks")), timeouts)


def from_image(labels: dict[str, str], flag: str | None, app_port: int, rootfs: Path) -> Hooks:
    """The image's hooks from its labels (the --hooks flag wins for the event list) and its files."""
    listed = flag if flag is not None else labels.get("mvm.hooks", "")
    http = frozenset(e.strip() for e in listed.split(",") if e.strip())
    unknown = sorted(http - set(EVENTS))
    if unknown:
        raise InvalidRequest(f"hooks: unknown event {unknown[0]!r} (known: {', '.join(EVENTS)})")
    port_text = labels.get("mvm.hooks.port", str(app_port))
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InvalidRequest(f"label mvm.hooks.port={port_text!r} must be a TCP port")
    prefix = labels.get("mvm.hooks.prefix", "/hooks").rstrip("/")
    if not prefix.startswith("/") or any(c.isspace() for c in prefix):
        raise InvalidRequest(f"label mvm.hooks.prefix={prefix!r} must be a path starting with /")
    timeouts = {}
    for event in EVENTS:
        for key in (f"mvm.hooks.{event}.timeout", "mvm.hooks.timeout"):
            if key in labels:
                timeouts[event] = _timeout(labels[key], key)
                break
    exec_events = frozenset(e for e in LIFECYCLE if _has_executables(rootfs / EXEC_DIR / f"{e}.d"))
    return Hooks(int(port_text), http, exec_events, prefix, timeouts)


def _timeout(text: str, key: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 1 <= value <= 60:
        raise InvalidRequest(f"label {key}={text!r} must be a number of seconds in [1, 60]")
    return value


def _has_executables(directory: Path) -> bool:
    if not directory.is_dir():
        return False
    return any(p.is_file() and p.stat().st_mode & 0o111 and not p.name.startswith(".") for p in directory.iterdir())


def check_payload(payload: Any) -> bytes:
    """A launch payload: any JSON value, at most 16 KiB once encoded."""
    try:
        body = orjson.dumps(payload)
    except TypeError as exc:
        raise InvalidRequest(f"run_payload is not JSON: {exc}") from None
    if len(body) > MAX_PAYLOAD:
        raise InvalidRequest(f"run_payload is {len(body)} bytes, more than {MAX_PAYLOAD}")
    return body


@dataclass(frozen=True)
class HookOutcome:
    ok: bool
    detail: str  # what it answered or why it failed, for the log


async def call_http(vm_id: str, hooks: Hooks, event: str, body: bytes) -> HookOutcome:
    """POST <prefix>/<event> to the guest from inside its namespace, within the hook's timeout."""
    path = hooks.path(event)
    try:
        status, _, answer = await probe.http_request(vm_id, hooks.port, path, hooks.timeout(event), "POST", body)
    except (OSError, TimeoutError, VmmError) as exc:
        return HookOutcome(False, f"POST {path}: {type(exc).__name__} {exc}".strip())
    text = answer[:500].decode(errors="replace").strip()
    return HookOutcome(200 <= status < 300, f"POST {path} answered {status}: {text}")
