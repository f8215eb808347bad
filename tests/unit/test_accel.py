from pathlib import Path

import pytest

from vmm import accel
from vmm.errors import InvalidRequest


def test_kvm_needs_real_vmx_or_svm_not_just_dev_kvm(tmp_path: Path) -> None:
    (tmp_path / "kvm").mkdir()
    (tmp_path / "kvm_pvm").mkdir()
    assert accel.host_has_hw_kvm(tmp_path) is False


def test_tcg_tells_the_guest_its_tsc_rate(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu MHz\t\t: 2100.000\n")
    assert accel.host_tsc_khz(cpuinfo) == 2_100_000
    chosen = accel.choose("tcg")
    assert chosen.qemu_args == ("-accel", "tcg", "-cpu", "max,-erms,-fsrm,-avx,-avx2")  # slow to emulate in TCG
    assert any(arg.startswith("tsc_early_khz=") for arg in chosen.kernel_args) and "tsc=reliable" in chosen.kernel_args


def test_kvm_by_request_and_bad_settings() -> None:
    assert accel.choose("kvm").qemu_args == ("-accel", "kvm", "-cpu", "host")
    with pytest.raises(InvalidRequest, match=r"vmm\.accelerator"):
        accel.choose("xen")
