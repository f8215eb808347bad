"""Load tools as bounded child processes: wrk for request rates, curl for stream speed.

Both are run with a command prefix (taskset, `ip netns exec <ns>`), and every run has a
wall-clock bound on top of the tool's own duration, so nothing can loop on forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_PERCENTILE = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", re.M)  # wrk pads "1.53s "
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_TO_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx/3xx answers plus socket errors: anything but 0 makes the row suspect


async def stop(proc: asyncio.subprocess.Process, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; fine if it already exited."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def run(argv: Sequence[str], timeout: float) -> tuple[int, str]:
    """Exit status and output (stdout and stderr together) of a command given `timeout` seconds."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        await stop(proc, grace=1.0)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def parse_wrk(out: str) -> WrkResult:
    rps = _RPS.search(out)
    percentiles = {p: float(v) * _TO_MS[unit] for p, v, unit in _PERCENTILE.findall(out)}
    if rps is None or set(percentiles) != {"50", "99"}:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    non_2xx = _NON_2XX.search(out)
    sockets = _SOCKET_ERRORS.search(out)
    errors = (int(non_2xx[1]) if non_2xx else 0) + (sum(map(int, sockets.groups())) if sockets else 0)
    return WrkResult(float(rps[1]), percentiles["50"], percentiles["99"], errors)


async def wrk(
    url: str, headers: Mapping[str, str], connections: int, seconds: int, prefix: Sequence[str] = ()
) -> WrkResult:
    """One wrk run: a single thread, `connections` keep-alive connections, `seconds` long."""
    argv = [*prefix, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    code, out = await run([*argv, url], seconds + 20)
    if code != 0:
        raise RuntimeError(f"wrk exited with {code}:\n{out}")
    return parse_wrk(out)


async def curl(url: str, args: Sequence[str], max_time: float, prefix: Sequence[str] = ()) -> tuple[int, int, float]:
    """Status, body bytes and average bytes/s of one GET, the body thrown away."""
    fmt = "\n%{http_code} %{size_download} %{speed_download}"
    argv = [*prefix, "curl", "-sS", "-o", "/dev/null", "--max-time", str(max_time), "-w", fmt, *args, url]
    code, out = await run(argv, max_time + 10)
    if code != 0:
        raise RuntimeError(f"curl exited with {code}: {out.strip()}")
    status, size, speed = out.rsplit("\n", 1)[-1].split()
    return int(status), int(size), float(speed)


def state_dir(path: Path) -> Path:
    """A bench's state directory: private (a jailed host refuses one others can read), with set-up's images."""
    path.mkdir(parents=True, mode=0o700)
    (path / "images").symlink_to(Path(__file__).resolve().parents[1] / "var" / "images")
    return path
