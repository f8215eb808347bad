"""image.toml validation, image.json loading and the reproducible initramfs writer."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from vmm import buildtools, initramfs
from vmm import image as image_mod
from vmm.errors import InvalidRequest, NotFound
from vmm.image import load_image
from vmm.image_spec import ImageSpec, load_spec

REPO = Path(__file__).resolve().parents[2]
DEMO_SPEC = REPO / "images" / "demo" / "image.toml"

VALID: dict[str, Any] = {
    "name": "demo",
    "kernel": {
        "package": "linux-image-cloud-amd64",
        "modules": ["virtio_mmio", "virtio_net"],
        "cmdline": "console=ttyS0 reboot=t panic=-1 quiet",
    },
    "initramfs": {"init": "init"},
    "app": {"source": "app.c", "port": 8080, "extra_ports": [8081]},
    "probe": {"method": "GET", "path": "/healthz", "expect_status": 200},
    "vm": {"memory_mb": 256, "vcpus": 1},
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string for these inputs
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def _to_toml(data: dict[str, Any]) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines.append(f"\n[{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def _write_spec(tmp_path: Path, data: dict[str, Any]) -> Path:
    (tmp_path / "app.c").write_text("int main(void) { return 0; }\n")
    (tmp_path / "init").write_text("#!/bin/busybox sh\n")
    path = tmp_path / "image.toml"
    path.write_text(_to_toml(data))
    return path


def _mutated(section: str | None, key: str, value: Any) -> dict[str, Any]:
    """VALID with one key set (value=...) or removed (value is _DELETE)."""
    data = copy.deepcopy(VALID)
    target = data if section is None else data[section]
    if value is _DELETE:
        del target[key]
    else:
        target[key] = value
    return data


_DELETE = object()


def test_demo_spec_loads() -> None:
    spec = load_spec(DEMO_SPEC)
    assert spec.name == "demo"
    assert spec.kernel_package == "linux-image-cloud-amd64"
    assert spec.modules == ("virtio_mmio", "virtio_net")
    assert spec.cmdline == "console=ttyS0 reboot=t panic=-1 quiet"
    assert spec.app_source == (REPO / "images" / "demo" / "app.c").resolve()
    assert spec.init == (REPO / "images" / "demo" / "init").resolve()
    assert (spec.app_port, spec.extra_ports, spec.ports) == (8080, (8081,), (8080, 8081))
    assert (spec.probe_method, spec.probe_path, spec.probe_status) == ("GET", "/healthz", 200)
    assert (spec.memory_mb, spec.vcpus) == (256, 1)
    assert spec.image_cmdline == "console=ttyS0 reboot=t panic=-1 quiet mvm.ports=8080,8081"


def test_valid_spec_and_defaults(tmp_path: Path) -> None:
    data = copy.deepcopy(VALID)
    del data["vm"]
    del data["probe"]["method"]
    del data["probe"]["expect_status"]
    del data["app"]["extra_ports"]
    spec = load_spec(_write_spec(tmp_path, data))
    assert isinstance(spec, ImageSpec)
    assert (spec.memory_mb, spec.vcpus, spec.probe_method, spec.probe_status) == (256, 1, "GET", 200)
    assert spec.ports == (8080,)
    assert spec.image_cmdline.endswith(" mvm.ports=8080")


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        (None, "name", _DELETE, "name: required key is missing"),
        (None, "name", "Demo Image", "name: invalid value"),
        (None, "name", 5, "name: must be a non-empty string"),
        (None, "colour", "blue", "colour: unknown key"),
        (None, "vm", 3, "vm: must be a table"),
        (None, "kernel", _DELETE, "kernel: required key is missing"),
        ("kernel", "package", _DELETE, "kernel.package: required key is missing"),
        ("kernel", "package", "Linux Image", "kernel.package: invalid value"),
        ("kernel", "modules", [], "kernel.modules: must name at least one module"),
        ("kernel", "modules", "virtio_net", "kernel.modules: must be a list"),
        ("kernel", "modules", ["virtio_net", "../evil"], "kernel.modules: invalid module name"),
        ("kernel", "modules", ["virtio_net", "virtio_net"], "kernel.modules: lists a module twice"),
        ("kernel", "cmdline", "console=ttyS0 mvm.ip=1.2.3.4/24", "kernel.cmdline: must not set mvm.ip"),
        ("kernel", "cmdline", "console=ttyS0\nquiet", "kernel.cmdline: must be one line"),
        ("kernel", "cmdline", "x" * 2000, "kernel.cmdline: longer than"),
        ("kernel", "flavour", "cloud", "kernel.flavour: unknown key"),
        ("initramfs", "init", "missing-init", "initramfs.init: file not found"),
        ("app", "source", "nope.c", "app.source: file not found"),
        ("app", "port", 0, "app.port: must be an integer in [1, 65535]"),
        ("app", "port", "8080", "app.port: must be an integer"),
        ("app", "port", True, "app.port: must be an integer"),
        ("app", "port", _DELETE, "app.port: required key is missing"),
        ("app", "extra_ports", [8080], "app.extra_ports: must not repeat"),
        ("app", "extra_ports", [9000, 9000], "app.extra_ports: must not repeat"),
        ("app", "extra_ports", [70000], "app.extra_ports: must be a list of TCP ports"),
        ("app", "extra_ports", list(range(9000, 9020)), "app.extra_ports: at most 16 ports"),
        ("app", "prot", 8080, "app.prot: unknown key"),
        ("probe", "path", "healthz", "probe.path: invalid value"),
        ("probe", "path", _DELETE, "probe.path: required key is missing"),
        ("probe", "method", "POST", "probe.method: must be GET or HEAD"),
        ("probe", "expect_status", 700, "probe.expect_status: must be an integer in [100, 599]"),
        ("vm", "memory_mb", 16, "vm.memory_mb: must be an integer in [64, 65536]"),
        ("vm", "vcpus", 0, "vm.vcpus: must be an integer in [1, 64]"),
        ("vm", "disk_gb", 1, "vm.disk_gb: unknown key"),
    ],
)
def test_invalid_spec_names_the_key(tmp_path: Path, section: str | None, key: str, value: Any, expected: str) -> None:
    path = _write_spec(tmp_path, _mutated(section, key, value))
    with pytest.raises(InvalidRequest) as err:
        load_spec(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "image.toml"
    path.write_text('name = "demo"\n[kernel\n')
    with pytest.raises(InvalidRequest, match="not valid TOML"):
        load_spec(path)


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="image spec not found"):
        load_spec(tmp_path / "nope.toml")


# ---------------------------------------------------------------- image.json


def _fake_image(images_dir: Path, name: str = "demo") -> dict[str, Any]:
    directory = images_dir / name
    directory.mkdir(parents=True)
    (directory / "vmlinuz").write_bytes(b"kernel")
    (directory / "initrd.img").write_bytes(b"initrd")
    meta = {
        "format": image_mod.FORMAT_VERSION,
        "name": name,
        "cmdline": "console=ttyS0 mvm.ports=8080,8081",
        "app_port": 8080,
        "ports": [8080, 8081],
        "probe": {"method": "GET", "path": "/healthz", "expect_status": 200},
        "memory_mb": 256,
        "vcpus": 1,
        "kernel": {"package": "linux-image-x", "version": "1.0"},
        "files": {
            "vmlinuz": {"sha256": hashlib.sha256(b"kernel").hexdigest()},
            "initrd.img": {"sha256": hashlib.sha256(b"initrd").hexdigest()},
        },
    }
    (directory / "image.json").write_text(json.dumps(meta))
    return meta


def test_load_image_round_trip(tmp_path: Path) -> None:
    _fake_image(tmp_path)
    image = load_image(tmp_path, "demo")
    assert image.kernel == (tmp_path / "demo" / "vmlinuz").resolve()
    assert image.initrd == (tmp_path / "demo" / "initrd.img").resolve()
    assert (image.app_port, image.ports, image.ready.path) == (8080, (8080, 8081), "/healthz")
    assert (image.memory_mb, image.vcpus, image.kernel_version) == (256, 1, "1.0")
    assert image.initrd_sha256 == hashlib.sha256(b"initrd").hexdigest()
    assert len(image.fingerprint) == 16


def test_load_image_not_built_tells_user_to_build(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="mvm image build"):
        load_image(tmp_path, "demo")


def test_load_image_missing_file(tmp_path: Path) -> None:
    _fake_image(tmp_path)
    (tmp_path / "demo" / "initrd.img").unlink()
    with pytest.raises(NotFound, match="incomplete"):
        load_image(tmp_path, "demo")


def test_load_image_rejects_bad_name(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="invalid image name"):
        load_image(tmp_path, "../etc")


def test_load_image_damaged_json(tmp_path: Path) -> None:
    meta = _fake_image(tmp_path)
    del meta["probe"]
    (tmp_path / "demo" / "image.json").write_text(json.dumps(meta))
    with pytest.raises(buildtools.VmmError, match="damaged"):
        load_image(tmp_path, "demo")


# ---------------------------------------------------------------- builder pieces


def test_missing_tool_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    with pytest.raises(buildtools.VmmError, match=r"gcc not found: run scripts/install\.sh"):
        buildtools.tool("gcc")


def test_static_elf_detection(tmp_path: Path) -> None:
    assert not buildtools.is_static_elf(Path(os.path.realpath("/bin/sh")))  # dynamically linked
    (tmp_path / "text").write_text("#!/bin/sh\n")
    assert not buildtools.is_static_elf(tmp_path / "text")
    assert not buildtools.is_static_elf(tmp_path / "missing")
    if shutil.which("gcc"):
        (tmp_path / "t.c").write_text("int main(void) { return 0; }\n")
        for flags, static in (([], False), (["-static"], True)):
            out = tmp_path / f"t{len(flags)}"
            if subprocess.run(["gcc", *flags, "-o", str(out), str(tmp_path / "t.c")], check=False).returncode == 0:
                assert buildtools.is_static_elf(out) is static


@pytest.mark.skipif(not (shutil.which("cpio") and shutil.which("gzip")), reason="needs cpio and gzip")
def test_initramfs_writer_is_reproducible(tmp_path: Path) -> None:
    digests = []
    for run, umask in ((1, 0o022), (2, 0o077)):  # different umask and mtimes: same bytes
        stage = tmp_path / f"stage{run}"
        old = os.umask(umask)
        try:
            for d in ("bin", "tmp", "etc"):
                (stage / d).mkdir(parents=True)
            (stage / "init").write_text("#!/bin/busybox sh\n")
            (stage / "etc" / "modules.order").write_text("a.ko\n")
            (stage / "bin" / "app").write_bytes(b"\x7fELF" + bytes(range(256)))
        finally:
            os.umask(old)
        os.utime(stage / "init", (1000 * run, 1000 * run))
        target = tmp_path / f"initrd{run}.img"
        initramfs.write(stage, target, 0, tmp_path / f"scratch{run}.cpio", set())
        digests.append(hashlib.sha256(target.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
