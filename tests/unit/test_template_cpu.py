"""A template's clones start on the CPU model its snapshot was made on, whatever this release picks for new ones."""

from pathlib import Path

import orjson
import pytest

from vmm import accel, template
from vmm.settings import VmmSettings


def _write(settings: VmmSettings, name: str, **extra: object) -> None:
    meta = {"name": name, "image": "img", "memory_mb": 256, "vcpus": 1, "app_port": 8080, "ports": [8080],
            "created_at": 0.0, "cmdline": "console=ttyS0", "accelerator": "tcg", **extra}  # fmt: skip
    (settings.templates_dir / name).mkdir(parents=True)
    (settings.templates_dir / name / "template.json").write_bytes(orjson.dumps(meta))


@pytest.mark.parametrize(("recorded", "started_on"), [({}, "max"), ({"cpu": "max,-erms"}, "max,-erms")])
def test_clones_start_on_the_templates_cpu(tmp_path: Path, recorded: dict[str, str], started_on: str) -> None:
    settings = VmmSettings(state_dir=tmp_path)
    _write(settings, "t", **recorded)
    spec = template.machine_spec(template.load(settings, "t"), "mvm-x", accel.choose("tcg"))
    assert spec.accel.qemu_args == ("-accel", "tcg", "-cpu", started_on)
    assert spec.accel.kernel_args == accel.choose("tcg").kernel_args


def test_new_templates_record_this_releases_cpu() -> None:
    tcg = accel.choose("tcg")
    assert tcg.cpu == accel.TCG_CPU and tcg.on_cpu(tcg.cpu) is tcg
