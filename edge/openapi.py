"""The control API's OpenAPI 3.1 document, served at /openapi.json."""

from __future__ import annotations

from typing import Any

from vmm.events import EVENT_TYPES
from vmm.model import VmState


def _op(summary: str, ok: int, schema: str | None = None, body: str | None = None, vm: bool = False) -> dict[str, Any]:
    responses: dict[str, Any] = {
        str(ok): {"description": "success"},
        "401": {"$ref": "#/components/responses/Error"},
        "422": {"$ref": "#/components/responses/Error"},
    }
    if schema:
        responses[str(ok)]["content"] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
    if vm:
        responses["404"] = {"$ref": "#/components/responses/Error"}
        responses["409"] = {"$ref": "#/components/responses/Error"}
        responses["503"] = {"$ref": "#/components/responses/Error"}
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if vm:
        op["parameters"] = [{"name": "vm_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    if body:
        ref = {"$ref": f"#/components/schemas/{body}"}
        op["requestBody"] = {"required": False, "content": {"application/json": {"schema": ref}}}
    return op


def _named(op: dict[str, Any]) -> dict[str, Any]:
    """An operation on a template or image by name: 404 unknown, 409 in use."""
    op["parameters"] = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    op["responses"]["404"] = op["responses"]["409"] = {"$ref": "#/components/responses/Error"}
    return op


def _public(summary: str) -> dict[str, Any]:
    """An operation without the admin key, which cannot fail on input."""
    return {"summary": summary, "security": [], "responses": {"200": {"description": "success"}}}


_EVENTS_SUMMARY = (
    "Lifecycle events as Server-Sent Events (id: seq, event: type, data: Event JSON; a `: keepalive` comment"
    ' every [events] keepalive seconds); follow=0: the retained ones as JSON {"events": [Event]}'
)
_SECONDS = {"type": ["number", "null"], "exclusiveMinimum": 0}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "microvm-edge control API", "version": "0.1.0"},
    "security": [{"admin": []}],
    "paths": {
        "/healthz": {"get": _public("Liveness")},
        "/metrics": {"get": _public("Prometheus metrics (text format)")},
        "/v1/templates": {
            "get": _op("List templates", 200),
            "post": _op("Boot an image once and snapshot it as a template", 201, "Template", "TemplateCreate"),
        },
        "/v1/templates/{name}": {"delete": _named(_op("Remove a template no VM uses", 204))},
        "/v1/images": {"get": _op("List built images", 200)},
        "/v1/images/{name}": {"delete": _named(_op("Remove an image no template uses", 204))},
        "/v1/vms": {
            "get": {
                **_op("One page of VMs, oldest first: {vms, next}; pass next as cursor for the page after", 200),
                "parameters": [
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
            },
            "post": _op("Launch a VM from a template (copy-on-write, no boot)", 201, "Vm", "VmCreate"),
        },
        "/v1/vms/{vm_id}": {
            "get": _op("Get one VM", 200, "Vm", vm=True),
            "delete": _op("Terminate and remove a VM", 204, vm=True),
        },
        "/v1/vms/{vm_id}/pause": {"post": _op("Pause in memory", 200, "Vm", vm=True)},
        "/v1/vms/{vm_id}/suspend": {"post": _op("Snapshot to disk; QEMU exits", 200, "Vm", vm=True)},
        "/v1/vms/{vm_id}/resume": {"post": _op("Resume or restore", 200, "Vm", vm=True)},
        "/v1/vms/{vm_id}/checkpoints": {
            "get": _op("The VM's checkpoints with their size and time", 200, vm=True),
            "post": _op("Checkpoint the VM now (paused for the capture only; a suspended VM is not woken)", 201,
                        "Checkpoint", "CheckpointCreate", vm=True),
        },
        "/v1/vms/{vm_id}/checkpoints/{name}": {
            "delete": {**_op("Delete a checkpoint; 409 lists what still reads through it", 204, vm=True),
                       "parameters": [{"name": "vm_id", "in": "path", "required": True, "schema": {"type": "string"}},
                                      {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]},
        },
        "/v1/vms/{vm_id}/restore": {
            "post": _op("Rewind the VM (same id, URL, tokens) to a checkpoint", 200, "Vm", "Rewind", vm=True),
        },
        "/v1/vms/{vm_id}/fork": {
            "post": _op("Start N VMs continuing from the VM's moment now or from a checkpoint", 201, None, "Fork",
                        vm=True),
        },
        "/v1/vms/{vm_id}/metrics": {
            "get": _op("What the VM uses now: CPU, memory, disk, network", 200, "VmMetrics", vm=True),
        },
        "/v1/vms/{vm_id}/logs": {
            "get": {
                **_op("The app's stdout and stderr (text); follow=1 streams new output", 200, vm=True),
                "parameters": [
                    {"name": "vm_id", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "tail", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "follow", "in": "query", "schema": {"enum": ["0", "1", "true"]}},
                ],
            }
        },
        "/v1/vms/{vm_id}/exec": {
            "post": {
                **_op("Run a command in the guest; the answer streams NDJSON (stdout/stderr base64, then "
                      "exit_code[, signal] or error[, timed_out])", 200, body="ExecRequest", vm=True),
            }
        },
        "/v1/vms/{vm_id}/files": {
            op: {
                **_op(summary, status, vm=True),
                "parameters": [
                    {"name": "vm_id", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "path", "in": "query", "required": True, "schema": {"type": "string", "pattern": "^/"}},
                    {"name": "timeout", "in": "query", "schema": {"type": "number", "exclusiveMinimum": 0,
                                                                  "maximum": 3600, "default": 300}},
                ],
            }
            for op, summary, status in (
                ("get", "A file's bytes (streamed), or a directory's entries as JSON", 200),
                ("put", "Write the request body to the file atomically (unnamed file, then rename)", 201),
                ("delete", "Remove a file or an empty directory (never /)", 204),
            )
        },
        "/v1/vms/{vm_id}/shell": {
            "get": _op("A login shell on a pty over a WebSocket (binary: terminal bytes; text: "
                       '{"resize": [cols, rows]}, then {"exit_code"}); without Upgrade: a terminal page', 101, vm=True)
        },
        "/v1/vms/{vm_id}/tokens": {"post": _op("Issue a VM-scoped token", 201, "Token", "TokenCreate", True)},
        "/v1/events": {
            "get": {
                **_op(_EVENTS_SUMMARY, 200),
                "parameters": [
                    {"name": "vm", "in": "query", "schema": {"type": "string"},
                     "description": "only these VMs' events (repeat or comma-separated)"},
                    {"name": "type", "in": "query", "schema": {"type": "string"},
                     "description": "only these types (repeat or comma-separated): " + ", ".join(EVENT_TYPES)},
                    {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0},
                     "description": "only events after this seq (as the Last-Event-ID header)"},
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "follow", "in": "query", "schema": {"enum": ["0", "1", "false", "true"]}},
                ],
            }
        },
        "/mcp": {"post": _op("The MCP server over streamable HTTP (stateless): JSON-RPC in, its answer out", 200)},
    },
    "components": {
        "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
        "responses": {
            "Error": {
                "description": "error",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
        },
        "schemas": {
            "Event": {
                "type": "object",
                "required": ["seq", "type", "vm", "state", "reason", "time", "template"],
                "properties": {
                    "seq": {"type": "integer", "description": "one more than the previous event's, installation-wide"},
                    "type": {"enum": list(EVENT_TYPES)},
                    "vm": {"type": "string"},
                    "state": {"type": ["string", "null"], "description": "the VM's state after the change"},
                    "reason": {"type": ["string", "null"]},
                    "time": {"type": "string", "format": "date-time"},
                    "template": {"type": ["string", "null"]},
                },
            },
            "Error": {
                "type": "object",
                "required": ["error", "message"],
                "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
            },
            "Policy": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "idle_pause_after": _SECONDS,
                    "idle_suspend_after": _SECONDS,
                    "max_lifetime": _SECONDS,
                    "memory_mb": {"type": "integer", "minimum": 64, "maximum": 32768},
                    "vcpus": {"type": "integer", "minimum": 1, "maximum": 16},
                    "disk_mb": {"type": "integer", "minimum": 0, "maximum": 32768},
                    "cpu_share": {"type": "number", "minimum": 0.01, "maximum": 1},
                    "ports": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 65535}},
                },
            },
            "CheckpointCreate": {
                "type": "object", "required": ["name"], "additionalProperties": False,
                "properties": {"name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"}},
            },
            "Checkpoint": {
                "type": "object",
                "properties": {"vm": {"type": "string"}, "name": {"type": "string"}, "created_at": {"type": "number"},
                               "bytes": {"type": "integer"}, "ram_file": {"type": "boolean"},
                               "paused_ms": {"type": "number"}},
            },
            "Rewind": {
                "type": "object", "required": ["checkpoint"], "additionalProperties": False,
                "properties": {"checkpoint": {"type": "string"}},
            },
            "Fork": {
                "type": "object", "required": ["count"], "additionalProperties": False,
                "properties": {"count": {"type": "integer", "minimum": 1, "maximum": 32},
                               "policy": {"$ref": "#/components/schemas/Policy"}, "checkpoint": {"type": "string"}},
            },
            "VmCreate": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "template": {"type": "string"},
                    "policy": {"$ref": "#/components/schemas/Policy"},
                    "run_payload": {"description": "any JSON (at most 16 KiB), given to the image's run hook"},
                    "from_checkpoint": {"type": "string", "description": "\"<vm>/<checkpoint>\": a fork of it instead"},
                },
            },
            "ExecRequest": {
                "type": "object",
                "required": ["argv"],
                "additionalProperties": False,
                "properties": {
                    "argv": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                    "env": {"type": "object", "additionalProperties": {"type": "string"}},
                    "cwd": {"type": "string", "pattern": "^/"},
                    "user": {"type": "string", "description": "root, <uid> or <uid>:<gid>"},
                    "stdin": {"type": "string"},
                    "stdin_b64": {"type": "string", "contentEncoding": "base64"},
                    "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
                },
            },
            "Vm": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "template": {"type": "string"},
                    "state": {"enum": [s.value for s in VmState]},
                    "policy": {"$ref": "#/components/schemas/Policy"},
                    "app_port": {"type": "integer"},
                    "created_at": {"type": "number"},
                    "last_activity": {"type": "number"},
                    "reason": {"type": ["string", "null"]},
                    "url": {"type": "string"},
                },
            },
            "VmMetrics": {
                "type": "object",
                "description": (
                    "CPU and memory read 0 while the VM has no QEMU (suspended); cpu_percent is over "
                    "the time since the VM's previous read (0 on the first), 100 is one whole CPU"
                ),
                "properties": {
                    "vm": {"type": "string"},
                    "state": {"enum": [s.value for s in VmState]},
                    "at": {"type": "number", "description": "Unix time of the read"},
                    "cpu_seconds": {"type": "number"},
                    "cpu_percent": {"type": "number"},
                    "memory_bytes": {"type": "integer"},
                    "memory_peak_bytes": {"type": "integer"},
                    "memory_limit_bytes": {"type": "integer", "description": "-1: no limit"},
                    "disk_bytes": {"type": "integer", "description": "allocated bytes of its overlay and RAM file"},
                    "net_rx_bytes": {"type": "integer", "description": "tap counters, host side: sent by the guest"},
                    "net_tx_bytes": {"type": "integer", "description": "tap counters, host side: sent to the guest"},
                },
            },
            "TemplateCreate": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "image": {"type": "string"},
                               "from_vm": {"type": "string", "description": "a VM's moment instead of an image"},
                               "checkpoint": {"type": "string", "description": "with from_vm: its checkpoint"}},
            },
            "Template": {"type": "object"},
            "TokenCreate": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "ttl": {"type": "number", "exclusiveMinimum": 0},
                    "scopes": {"type": "array", "items": {"enum": ["http", "exec", "files", "shell"]}, "minItems": 1},
                    "ports": {"type": "string", "description": '"all", "8080" or "8000-8100"'},
                },
            },
            "Token": {
                "type": "object",
                "properties": {
                    "vm": {"type": "string"},
                    "token": {"type": "string"},
                    "expires_at": {"type": "number"},
                    "url": {"type": "string"},
                },
            },
        },
    },
}
