"""Real-app benchmark: images/flask-app (Flask + gunicorn from PyPI, a model loaded at import) against
python-sandbox (stdlib only), in one run.

- flask-app built from scratch (`--no-cache`: apt, then pip), and rebuilt after a change to app.py
  alone (the apt and pip layers come from the cache), each split into buildah / export / disk
  (a plain build in between, untimed: see the README's known limits about `--no-cache`);
- template creation (boot → ready → snapshot) of both, with flask-app's init time as it reports it;
- clone → first answer and restore → first answer of both, `--cycles` times each.
Everything runs in a scratch state directory (beside the shared buildah store and kernel cache of
var/), removed at the end. Every loop is bounded.
Usage: .venv/bin/python -m bench.app_bench [--cycles 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.e2e.guest import guest_request
from vmm import probe
from vmm.disk_image import BuildOptions, build_from_dockerfile
from vmm.image import load_image
from vmm.manager import VmManager
from vmm.settings import VmmSettings

from .stats import median, p95, table

REPO = Path(__file__).resolve().parents[1]
FLASK = REPO / "images" / "flask-app"


def _build(context: Path, root: Path, no_cache: bool) -> dict[str, float]:
    """One `mvm image build`, timed as a whole and by phase (the numbered steps' start times)."""
    marks: list[tuple[str, float]] = []
    lines: list[str] = []

    def progress(line: str) -> None:
        lines.append(line)
        if line.startswith("["):
            marks.append((line, time.perf_counter()))

    started = time.perf_counter()
    build_from_dockerfile(context / "Dockerfile", context, BuildOptions(name="flask-app", no_cache=no_cache),
                          root / "images", root, progress)  # fmt: skip
    ended = time.perf_counter()
    at = {text.split("]")[0] + "]": t for text, t in marks}
    steps = next(line for line in lines if "step times:" in line).split("step times:")[1]
    times = dict(part.strip().split(" ", 1) for part in steps.split(","))
    seconds = {k: (0.0 if v == "cached" else float(v.split()[0])) for k, v in times.items()}
    return {
        "total": ended - started,
        "buildah": at["[6/9]"] - at["[5/9]"],
        "apt": seconds["2/11"],
        "pip": seconds["4/11"],
        "export": at["[7/9]"] - at["[6/9]"],
        "disk": ended - at["[7/9]"],
    }


async def _cycles(manager: VmManager, template: str, image: str, cycles: int) -> dict[str, list[float]]:
    ready = load_image(manager.settings.images_dir, image).ready
    clone: list[float] = []
    restore: list[float] = []
    for _ in range(cycles):
        t0 = time.perf_counter()
        vm = await manager.create_vm(template)
        await probe.wait_ready(vm.id, ready, 60.0, lambda: True)
        clone.append(time.perf_counter() - t0)
        await manager.suspend(vm.id)
        t0 = time.perf_counter()
        await manager.ensure_running(vm.id)
        await probe.wait_ready(vm.id, ready, 60.0, lambda: True)
        restore.append(time.perf_counter() - t0)
        await manager.delete(vm.id)
    return {"clone": clone, "restore": restore}


async def _run(cycles: int, root: Path) -> str:
    scratch = _build(FLASK, root, no_cache=True)
    # buildah 1.28 takes the first cached image matching a step, which after --no-cache can be one of
    # another chain: a plain build first, so the timed rebuild below measures the usual case.
    _build(FLASK, root, no_cache=False)
    changed = root / "flask-app-changed"
    shutil.copytree(FLASK, changed)
    with open(changed / "app.py", "a") as app:
        app.write("\n# a change to the app alone\n")
    rebuild = _build(changed, root, no_cache=False)

    manager = VmManager(VmmSettings(state_dir=root))
    await manager.start()
    try:
        t0 = time.perf_counter()
        await manager.create_template("flask", "flask-app", lambda _: None)
        flask_template = time.perf_counter() - t0
        t0 = time.perf_counter()
        await manager.create_template("sandbox", "python-sandbox", lambda _: None)
        sandbox_template = time.perf_counter() - t0
        probe_vm = await manager.create_vm("flask")
        state: dict[str, Any] = json.loads((await guest_request(probe_vm.id, "/"))[1])
        await manager.delete(probe_vm.id)
        flask = await _cycles(manager, "flask", "flask-app", cycles)
        sandbox = await _cycles(manager, "sandbox", "python-sandbox", cycles)
    finally:
        for rec in list(manager.list_vms()):
            await manager.delete(rec.id)
        await manager.close()

    def row(name: str, key: str) -> list[object]:
        a, b = sandbox[key], flask[key]
        return [name, len(a), f"{median(a) * 1000:.0f}", f"{p95(a) * 1000:.0f}", f"{median(b) * 1000:.0f}",
                f"{p95(b) * 1000:.0f}", f"{median(b) / median(a):.2f}"]  # fmt: skip

    runs = (("from scratch (--no-cache)", scratch), ("after a change to app.py", rebuild))
    keys = ("total", "buildah", "apt", "pip", "export", "disk")
    builds = [[name, *(f"{b[k]:.1f}" for k in keys)] for name, b in runs]
    return "\n".join([
        table(["flask-app build", "total s", "buildah s", "apt step s", "pip step s", "export s", "disk s"], builds),
        "",
        f"template creation (boot → ready → snapshot): python-sandbox {sandbox_template:.1f} s, flask-app "
        f"{flask_template:.1f} s, of which its init {state['init_seconds']:.1f} s "
        f"(init count seen by a clone: {state['init_count']})",
        "",
        table(["operation", "n", "sandbox median ms", "sandbox p95 ms", "flask median ms", "flask p95 ms",
               "flask / sandbox"], [row("clone → first answer", "clone"), row("restore → first answer", "restore")]),
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=10)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mvma-", dir="/tmp"))
    try:
        (root / "images").mkdir()
        (root / "images" / "python-sandbox").symlink_to(REPO / "var" / "images" / "python-sandbox")
        for name in ("containers", "cache"):
            (root / name).symlink_to(REPO / "var" / name)
        print(asyncio.run(_run(max(2, min(args.cycles, 100)), root)))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
