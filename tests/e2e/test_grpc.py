"""gRPC end to end: grpcio's client over TLS (ALPN h2) to the edge, the edge over prior-knowledge h2c
to images/grpc-app (grpcio, port 50051 labelled `mvm.port.50051.protocol = "h2c"`) in a real VM.

The four call kinds, a status error with its message, a deadline that expires, a client cancel that
the server sees, and a call that wakes a suspended VM. One edge, template and VM for the module; the
sync grpcio client runs in threads, since the edge runs in this event loop.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from tests.e2e.conftest import IMAGES, _kill_qemus
from tests.e2e.edge_harness import DOMAIN, Client, edge_config, running_edge
from vmm.network import netns
from vmm.settings import VmmSettings

pytestmark = pytest.mark.asyncio(loop_scope="module")

IMAGE = "grpc-app"
SERVICE = "/mvm.Demo/"


def _dump(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _load(data: bytes) -> Any:
    return json.loads(data)


class Setup:
    def __init__(self, client: Client, vm_id: str, token: str) -> None:
        self.client, self.vm_id = client, vm_id
        self.metadata = (("authorization", f"Bearer {token}"),)
        host = f"{vm_id}.{DOMAIN}"
        creds = grpc.ssl_channel_credentials(root_certificates=client.edge.cfg.server.tls_cert.read_bytes())
        options = (("grpc.ssl_target_name_override", host), ("grpc.default_authority", host))
        self.channel = grpc.secure_channel(f"127.0.0.1:{client.edge.port}", creds, options=options)

    def unary(self, method: str) -> Callable[..., Any]:
        return self.channel.unary_unary(SERVICE + method, request_serializer=_dump, response_deserializer=_load)

    def server_stream(self, method: str) -> Callable[..., Any]:
        return self.channel.unary_stream(SERVICE + method, request_serializer=_dump, response_deserializer=_load)

    def client_stream(self, method: str) -> Callable[..., Any]:
        return self.channel.stream_unary(SERVICE + method, request_serializer=_dump, response_deserializer=_load)

    def bidi(self, method: str) -> Callable[..., Any]:
        return self.channel.stream_stream(SERVICE + method, request_serializer=_dump, response_deserializer=_load)

    async def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await asyncio.to_thread(fn, *args, metadata=self.metadata, **kw)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup(session_root: Path) -> AsyncIterator[Setup]:
    if not (IMAGES / IMAGE / "image.json").exists():
        pytest.fail(f"guest image {IMAGE} missing: run scripts/install.sh (builds var/images/{IMAGE})")
    state = Path(tempfile.mkdtemp(prefix="grpc", dir=session_root))
    (state / "images").symlink_to(IMAGES)
    settings = replace(VmmSettings(), state_dir=state)
    cfg = edge_config(settings)
    try:
        async with running_edge(cfg) as client:
            await client.api("POST", "/v1/templates", {"name": "grpcapp", "image": IMAGE}, status=201)
            vm = await client.api("POST", "/v1/vms", {"template": "grpcapp"}, status=201)
            token = await client.token(vm["id"], ttl=3600)
            s = Setup(client, vm["id"], token)
            try:
                yield s
            finally:
                s.channel.close()
    finally:
        _kill_qemus(state)
        for vm_dir in (state / "vms").iterdir() if (state / "vms").exists() else []:
            await netns.delete(vm_dir.name)
        subprocess.run(["rm", "-rf", str(state)], check=False)


async def test_the_four_call_kinds(setup: Setup) -> None:
    answer = await setup.call(setup.unary("Echo"), {"hello": "vm"})
    assert answer["echo"] == {"hello": "vm"}

    def count() -> list[Any]:
        return list(setup.server_stream("Count")({"n": 5}, metadata=setup.metadata))

    assert await asyncio.to_thread(count) == [{"i": i} for i in range(5)]
    answer = await setup.call(setup.client_stream("Sum"), iter([{"v": v} for v in range(10)]))
    assert answer == {"sum": 45, "count": 10}

    def chat() -> list[Any]:
        return list(setup.bidi("Chat")(iter([{"say": w} for w in ("a", "b", "c")]), metadata=setup.metadata))

    assert await asyncio.to_thread(chat) == [{"reply": w} for w in ("a", "b", "c")]


async def test_a_status_error_keeps_its_code_and_message(setup: Setup) -> None:
    with pytest.raises(grpc.RpcError) as err:
        await setup.call(setup.unary("Fail"), {"code": "PERMISSION_DENIED", "message": "not you, ünïcode"})
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == "not you, ünïcode"


async def test_a_deadline_expires_and_a_cancel_reaches_the_server(setup: Setup) -> None:
    with pytest.raises(grpc.RpcError) as err:
        await setup.call(setup.unary("Slow"), {"seconds": 30, "id": "deadline"}, timeout=1.0)
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED

    call_id = uuid.uuid4().hex
    future = setup.unary("Slow").future({"seconds": 60, "id": call_id}, metadata=setup.metadata)
    for _ in range(200):  # bounded: the call is under way once the server has seen its id
        if (await setup.call(setup.unary("WasCancelled"), {"id": call_id}))["seen"]:
            break
        await asyncio.sleep(0.05)
    assert future.cancel()
    for _ in range(200):  # the RST_STREAM crosses the edge to the guest: the server notes it
        state = await setup.call(setup.unary("WasCancelled"), {"id": call_id})
        if state["cancelled"]:
            break
        await asyncio.sleep(0.05)
    assert state == {"seen": True, "cancelled": True}


async def test_a_call_wakes_a_suspended_vm(setup: Setup) -> None:
    await setup.client.api("POST", f"/v1/vms/{setup.vm_id}/suspend", status=200)
    assert setup.client.edge.manager.get(setup.vm_id).state.value == "suspended"
    answer = await setup.call(setup.unary("Echo"), {"after": "wake"}, timeout=60)
    assert answer["echo"] == {"after": "wake"}
    assert setup.client.edge.manager.get(setup.vm_id).state.value == "running"


async def test_an_http1_request_to_the_h2c_port_gets_a_502_that_says_why(setup: Setup) -> None:
    client = setup.client
    headers = {"Authorization": setup.metadata[0][1]}
    async with client.session.post(client.vm_url(setup.vm_id, SERVICE + "Echo"), headers=headers) as resp:
        assert resp.status == 502
        assert "HTTP/2 only (h2c)" in (await resp.json())["message"]
