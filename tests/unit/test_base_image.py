"""The Debian base image's version label: a store holding this version keeps it, any other is made again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from vmm import oci


def _fake_store(monkeypatch: pytest.MonkeyPatch, labels: dict[str, str] | None) -> list[list[str]]:
    """buildah and mmdebstrap replaced: the store holds an image with `labels` (None: no image)."""
    calls: list[list[str]] = []

    def run(argv: list[str], what: str, **_: Any) -> str:
        calls.append(argv)
        if "inspect" in argv:
            if labels is None:
                raise oci.VmmError("no such image")
            if "--format" in argv:
                return "old-id\n"
            return orjson.dumps({"OCIv1": {"config": {"Labels": labels}}}).decode()
        return "container\n" if "from" in argv else ""

    monkeypatch.setattr(oci, "run", run)
    monkeypatch.setattr(oci, "tool", lambda name: name)
    return calls


def test_this_version_is_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _fake_store(monkeypatch, {oci.BASE_VERSION_LABEL: oci.base_version()})
    assert oci.ensure_base_image(oci.Store(tmp_path), lambda _: None) == oci.BASE_IMAGE
    assert not any("mmdebstrap" in argv for argv in calls)


@pytest.mark.parametrize("labels", [{}, {oci.BASE_VERSION_LABEL: "older"}, None])
def test_another_version_is_made_again_with_the_label(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, labels: dict[str, str] | None
) -> None:
    calls = _fake_store(monkeypatch, labels)
    said: list[str] = []
    oci.ensure_base_image(oci.Store(tmp_path), said.append)
    debootstrap = next(argv for argv in calls if argv[0] == "mmdebstrap")
    assert "--include=python3,ca-certificates,procps,less,vim-tiny" in debootstrap
    config = next(argv for argv in calls if "config" in argv)
    assert f"{oci.BASE_VERSION_LABEL}={oci.base_version()}" in config
    assert any("making it again" in line for line in said) == (labels is not None)


def test_the_version_follows_the_package_list(monkeypatch: pytest.MonkeyPatch) -> None:
    before = oci.base_version()
    monkeypatch.setattr(oci, "BASE_PACKAGES", (*oci.BASE_PACKAGES, "htop"))
    assert oci.base_version() != before
