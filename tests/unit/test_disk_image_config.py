"""How an image's config becomes what the guest init runs: ports, readiness, sizes, user, /mvm/config."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from vmm import buildtools, oci
from vmm.disk_image import (
    GUEST_INIT_COMPANIONS,
    GUEST_INIT_SOURCE,
    BuildOptions,
    RunConfig,
    _resolve_user,
    _run_config,
    _settings,
)
from vmm.errors import InvalidRequest, VmmError


def _config(**overrides: Any) -> oci.ImageConfig:
    base: dict[str, Any] = {
        "entrypoint": (), "cmd": ("python3", "app.py"), "env": ("A=b",), "working_dir": "/srv", "user": "",
        "exposed_ports": (8080,), "labels": {},
    }  # fmt: skip
    base.update(overrides)
    return oci.ImageConfig(**base)


def test_flags_win_over_labels_which_win_over_defaults() -> None:
    labels = {"mvm.port": "9000", "mvm.memory_mb": "1024", "mvm.ready": "http:/up"}
    got = _settings(_config(labels=labels), BuildOptions(port=7000, vcpus=2))
    assert got == {"port": 7000, "ready": "http:/up", "memory_mb": 1024, "vcpus": 2, "disk_mb": 1024}
    assert _settings(_config(), BuildOptions())["ready"] == "tcp"


@pytest.mark.parametrize(
    ("config", "options", "message"),
    [
        (_config(exposed_ports=()), BuildOptions(), "EXPOSE one port"),
        (_config(exposed_ports=(80, 443)), BuildOptions(), "exposes 80, 443"),
        (_config(labels={"mvm.vcpus": "two"}), BuildOptions(), "mvm.vcpus='two'"),
        (_config(), BuildOptions(memory_mb=32769), r"image\.memory_mb"),
        (_config(), BuildOptions(disk_mb=32), "at least 64"),
        (_config(), BuildOptions(ready="https:/x"), "ready must be"),
        (_config(), BuildOptions(port=70000), r"\[1, 65535\]"),
    ],
)
def test_bad_settings_name_what_is_wrong(config: oci.ImageConfig, options: BuildOptions, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        _settings(config, options)


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("mvm.memory_mb=0", r"^label mvm.memory_mb='0' must be a whole number in \[64, 32768\]$"),
        ("mvm.vcpus=0", r"^label mvm.vcpus='0' must be a whole number in \[1, 16\]$"),
        ("mvm.port=0", r"^label mvm.port='0' must be a whole number in \[1, 65535\]$"),
        ("mvm.disk_mb=0", r"^label mvm.disk_mb='0' must be a whole number in \[64, 32768\]$"),
        ("mvm.vcpus=17", r"^label mvm.vcpus='17' must be a whole number in \[1, 16\]$"),
        ("mvm.memory_mb=²", r"^label mvm.memory_mb='²' must be a whole number"),
    ],
)
def test_a_label_of_zero_or_out_of_bounds_is_refused_not_defaulted(label: str, message: str) -> None:
    key, _, value = label.partition("=")
    with pytest.raises(InvalidRequest, match=message):
        _settings(_config(labels={key: value}), BuildOptions())


def _rootfs(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text("root:x:0:\napp:x:1001:\nstaff:x:50:\n")
    return tmp_path


@pytest.mark.parametrize(
    ("user", "ids"),
    [("", (0, 0)), ("app", (1000, 1001)), ("1000", (1000, 1001)), ("app:staff", (1000, 50)),
     ("1234:5678", (1234, 5678)), ("app:7", (1000, 7))],
)  # fmt: skip
def test_user_is_resolved_from_the_images_own_files(tmp_path: Path, user: str, ids: tuple[int, int]) -> None:
    assert _resolve_user(user, _rootfs(tmp_path)) == ids


def test_unknown_user_or_group(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="no user 'nobody'"):
        _resolve_user("nobody", _rootfs(tmp_path))
    with pytest.raises(InvalidRequest, match="no group 'wheel'"):
        _resolve_user("app:wheel", tmp_path)


def test_run_config_merges_entrypoint_and_cmd_and_renders(tmp_path: Path) -> None:
    cfg = _config(entrypoint=("/bin/tini", "--"), env=("PATH=/opt/bin", "X=1 2"), exposed_ports=(8080, 9090))
    run = _run_config(cfg, _rootfs(tmp_path), 9090, "demo-app")
    assert run.argv == ("/bin/tini", "--", "python3", "app.py")
    assert run.ports == (9090, 8080)
    text = run.render()
    assert text.splitlines()[:5] == ["arg /bin/tini", "arg --", "arg python3", "arg app.py", "env PATH=/opt/bin"]
    assert "env X=1 2\ncwd /srv\nuid 0\ngid 0\nhostname demo-app\nport 9090\nport 8080\n" in text
    assert _run_config(_config(), tmp_path, 8080, "x").env[0].startswith("PATH=/usr/local/sbin")


def test_exec_aslr_label_is_on_or_off_and_only_off_reaches_the_config(tmp_path: Path) -> None:
    rootfs = _rootfs(tmp_path)

    def render(labels: dict[str, str]) -> str:
        return _run_config(_config(labels=labels), rootfs, 8080, "x").render()

    assert "exec_aslr" not in render({}) and "exec_aslr" not in render({"mvm.exec.aslr": "on"})
    assert render({"mvm.exec.aslr": "off"}).endswith("port 8080\nexec_aslr off\n")
    with pytest.raises(InvalidRequest, match=r"mvm\.exec\.aslr='no': must be on or off"):
        render({"mvm.exec.aslr": "no"})


def test_nothing_to_run_or_a_line_break_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="nothing to run"):
        _run_config(_config(cmd=()), tmp_path, 8080, "x")
    with pytest.raises(InvalidRequest, match="line break"):
        RunConfig(("sh",), ("A=b\nc",), "/", 0, 0, "x", ()).render()


# ---------------------------------------------------------------- OCI layouts and archives


def _layout(root: Path, config: dict[str, Any], manifests: int = 1) -> Path:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: dict[str, Any]) -> str:
        raw = json.dumps(data).encode()
        digest = hashlib.sha256(raw).hexdigest()
        (blobs / digest).write_bytes(raw)
        return f"sha256:{digest}"

    manifest = blob({"schemaVersion": 2, "config": {"digest": blob({"config": config})}, "layers": []})
    (root / "index.json").write_text(json.dumps({"manifests": [{"digest": manifest}] * manifests}))
    return root


def test_image_config_is_read_from_the_layout(tmp_path: Path) -> None:
    layout = _layout(tmp_path, {
        "Entrypoint": ["/init"], "Cmd": None, "Env": ["A=1"], "WorkingDir": "/w", "User": "1:2",
        "ExposedPorts": {"8080/tcp": {}, "53/udp": {}, "9000": {}}, "Labels": {"mvm.port": "8080"},
    })  # fmt: skip
    cfg = oci._read_config(layout)
    assert cfg == oci.ImageConfig(("/init",), (), ("A=1",), "/w", "1:2", (8080, 9000), {"mvm.port": "8080"})


def test_a_layout_with_several_images_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="holds 2 images"):
        oci._read_config(_layout(tmp_path, {}, manifests=2))
    (tmp_path / "index.json").write_text("{broken")
    with pytest.raises(VmmError, match=r"bad index\.json"):
        oci._read_config(tmp_path)


def _tar(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    return path


def test_archive_kind_is_recognised_by_its_members(tmp_path: Path) -> None:
    assert oci._archive_transport(_tar(tmp_path / "a.tar", ["oci-layout", "index.json"])) == "oci-archive"
    assert oci._archive_transport(_tar(tmp_path / "b.tar", ["manifest.json", "x/layer.tar"])) == "docker-archive"
    with pytest.raises(InvalidRequest, match=r"no index\.json or manifest\.json"):
        oci._archive_transport(_tar(tmp_path / "c.tar", ["hello"]))
    (tmp_path / "d.tar").write_bytes(b"garbage" * 200)
    with pytest.raises(InvalidRequest, match="not an OCI or docker archive"):
        oci._archive_transport(tmp_path / "d.tar")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is installed by scripts/install.sh")
def test_guest_init_builds_static_without_warnings(tmp_path: Path) -> None:
    out = tmp_path / "init"
    subprocess.run(
        ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(GUEST_INIT_SOURCE),
         *(str(f) for f in GUEST_INIT_COMPANIONS if f.suffix == ".c")],
        check=True, capture_output=True,
    )  # fmt: skip
    assert buildtools.is_static_elf(out)
