"""gRPC unary calls/s through the edge against direct to the guest, in one run.

One VM of images/grpc-app (its port 50051 labelled h2c). The same grpcio client, a process of its
own with `--concurrency` threads on one channel, calls `mvm.Demo/Echo` `--calls` times: once over
TLS (ALPN h2) to the edge on 127.0.0.1, which relays each call over prior-knowledge h2c; once from
inside the VM's network namespace straight to the guest's port. Goal: edge ≥ 0.8x direct. The edge
opens a guest connection per call (edge/h2c_relay.py), so part of the gap is that connect.
Usage: .venv/bin/python -m bench.grpc_bench [--calls 2000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import uvloop

from tests.e2e.conftest import IMAGES, _kill_qemus
from tests.e2e.edge_harness import DOMAIN, edge_config, running_edge
from vmm.network import netns
from vmm.settings import VmmSettings

from .stats import table

IMAGE = "grpc-app"
REPO = Path(__file__).resolve().parents[1]


def client(target: str, calls: int, concurrency: int, cert: str, authority: str, token: str) -> None:
    """The load: `calls` unary calls on one channel from `concurrency` threads; prints calls/s as JSON."""
    import grpc  # only the client process needs it

    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    if cert:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(cert).read_bytes())
        options = (("grpc.ssl_target_name_override", authority), ("grpc.default_authority", authority))
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target)
    echo = channel.unary_unary(
        "/mvm.Demo/Echo", request_serializer=lambda doc: json.dumps(doc).encode(), response_deserializer=json.loads
    )
    echo("warm", metadata=metadata, timeout=60)
    failed = 0

    def worker(n: int) -> None:
        nonlocal failed
        for _ in range(n):
            try:
                echo("x", metadata=metadata, timeout=30)
            except grpc.RpcError:
                failed += 1

    share = [calls // concurrency + (i < calls % concurrency) for i in range(concurrency)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, share))
    seconds = time.perf_counter() - t0
    channel.close()
    print(json.dumps({"calls_per_s": calls / seconds, "seconds": seconds, "failed": failed}))


async def _load(argv: list[str]) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO
    )  # not subprocess.run: the edge runs in this loop
    out, err = await asyncio.wait_for(proc.communicate(), 600)
    if proc.returncode != 0:
        raise RuntimeError(f"load client failed: {err.decode()[-1500:]}")
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


async def _run(root: Path, calls: int, concurrency: int) -> str:
    settings = replace(VmmSettings(), state_dir=root)
    cfg = edge_config(settings)
    me = [sys.executable, "-m", "bench.grpc_bench", "client", "--calls", str(calls), "--concurrency", str(concurrency)]
    async with running_edge(cfg) as c:
        await c.api("POST", "/v1/templates", {"name": "grpcbench", "image": IMAGE}, status=201)
        vm = await c.api("POST", "/v1/vms", {"template": "grpcbench"}, status=201)
        try:
            token = await c.token(vm["id"], ttl=3600)
            edge = await _load([*me, "--target", f"127.0.0.1:{c.edge.port}", "--cert", str(cfg.server.tls_cert),
                                "--authority", f"{vm['id']}.{DOMAIN}", "--token", token])  # fmt: skip
            direct = await _load(["ip", "netns", "exec", netns.ns_name(vm["id"]), *me,
                                  "--target", f"{netns.GUEST_IP}:50051"])  # fmt: skip
        finally:
            await c.api("DELETE", f"/v1/vms/{vm['id']}")
    rows = [
        [name, f"{r['calls_per_s']:.0f}", f"{r['seconds']:.1f}", int(r["failed"])]
        for name, r in (("through the edge (TLS h2 → h2c)", edge), ("direct, in the VM's namespace (h2c)", direct))
    ]
    ratio = edge["calls_per_s"] / direct["calls_per_s"]
    return "\n".join([
        f"gRPC unary Echo, {calls} calls, {concurrency} threads on one channel, one TCG guest",
        "",
        table(["path", "calls/s", "seconds", "failed"], rows),
        "",
        f"edge / direct: {ratio:.2f}x (goal ≥ 0.8x)",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", nargs="?", choices=("bench", "client"), default="bench")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--target", default="")
    parser.add_argument("--cert", default="")
    parser.add_argument("--authority", default="")
    parser.add_argument("--token", default="")
    args = parser.parse_args()
    if args.mode == "client":
        client(args.target, args.calls, args.concurrency, args.cert, args.authority, args.token)
        return
    if not (IMAGES / IMAGE / "image.json").exists():
        sys.exit(f"image {IMAGE} missing: run scripts/install.sh")
    root = Path(tempfile.mkdtemp(prefix="mvmg-", dir="/tmp"))
    try:
        (root / "images").symlink_to(IMAGES)
        print(uvloop.run(_run(root, args.calls, args.concurrency)))
    finally:
        _kill_qemus(root)  # only this run's (their command lines name its state directory)
        for vm_dir in (root / "vms").iterdir() if (root / "vms").exists() else []:
            uvloop.run(netns.delete(vm_dir.name))
        subprocess.run(["rm", "-rf", str(root)], check=False)


if __name__ == "__main__":
    main()
