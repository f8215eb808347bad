"""nginx as the benchmarks' reference: a fixed-answer upstream and a keep-alive reverse proxy.

Each instance gets its own directory (config, pid, logs, temp paths) so nothing touches
the system's nginx, and runs in the foreground as our child so it dies with the run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from .tools import stop

_CONF = """daemon off;
master_process {master};
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  keepalive_requests 1000000;
{servers}
}}
"""


def fixed_answer(port: int, body: str, name_the_path: bool = False) -> str:
    """A server block answering every request with `body` (the fast upstream); `name_the_path`: with
    an X-Path header saying the request's path, so answers to different paths differ."""
    named = " add_header X-Path $uri;" if name_the_path else ""
    return f"""  server {{
    listen 127.0.0.1:{port} backlog=1024;
    location / {{ default_type text/plain;{named} return 200 "{body}"; }}
  }}"""


def reverse_proxy(
    upstream: str, keepalive: int, listeners: Sequence[tuple[int, bool]], cert: Path, key: Path, http2: bool = False
) -> str:
    """An HTTP/1.1 proxy to `upstream`, keeping up to `keepalive` idle upstream connections
    (the edge's per-VM pool bound), on 127.0.0.1 ports given as (port, tls), with HTTP/2 on TLS
    when `http2`.

    Headers like the edge's (Host kept, X-Forwarded-*), and no response buffering: the
    edge streams, so nginx should too (and must not spill a 100 MB answer to disk).
    """
    ssl = " ssl http2" if http2 else " ssl"  # `http2`: ALPN h2 on its TLS listeners
    listen = "\n".join(f"    listen 127.0.0.1:{port}{ssl if tls else ''} backlog=1024;" for port, tls in listeners)
    return f"""  upstream guest {{ server {upstream}; keepalive {keepalive}; keepalive_requests 1000000; }}
  server {{
{listen}
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location / {{
      proxy_pass http://guest;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_buffering off;
    }}
  }}"""


@contextlib.asynccontextmanager
async def running(
    workdir: Path, servers: str, prefix: Sequence[str] = (), master: bool = True, workers: int = 1
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run nginx with `servers` until the block ends; `prefix` wraps the command
    (taskset, `ip netns exec`, both exec nginx, so the pid is nginx's own).

    `master=False` runs a single process, so one pid is all there is to re-pin.
    """
    workdir.mkdir(parents=True)
    conf = workdir / "nginx.conf"
    conf.write_text(_CONF.format(master="on" if master else "off", workers=workers, dir=workdir, servers=servers))
    pid_file = workdir / "nginx.pid"
    proc = await asyncio.create_subprocess_exec(
        *prefix, "nginx", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log"),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # nginx binds its listeners before it writes the pid file.
        for _ in range(100):
            if pid_file.exists() or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        if not pid_file.exists():
            log = (workdir / "error.log").read_text() if (workdir / "error.log").exists() else ""
            raise RuntimeError(f"nginx in {workdir} did not start: {log.strip()[-2000:]}")
        yield proc
    finally:
        await stop(proc)
