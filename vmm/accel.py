"""Choose QEMU's accelerator from what the host really offers.

/dev/kvm alone is not enough: on kvm_pvm hosts it exists but runs stock kernels through
instruction emulation, so KVM is chosen only with real VMX/SVM (the kvm_intel or kvm_amd
module loaded). TCG needs the guest told the TSC rate, or its PIT calibration fails at
random and the boot hangs.

Under TCG the guest CPU is `max` without ERMS and FSRM. TCG runs `rep movsb`/`rep stosb`
one byte per loop turn, and a guest that sees those flags copies and clears memory with them
everywhere (the kernel's copies to and from user space, glibc's memcpy): hidden, it takes
wider moves, and 50 MB of exec stdout went from 4.2 s to 1.1-2.0 s (python-sandbox, same run).
AVX and AVX2 are hidden too: TCG emulates them through helpers, and a guest without them takes
SSE (50 MB of exec stdout in 0.7 s instead of 2.6, a Python 200 MB allocate+copy in 1.8 s
instead of 5.4-9.6). A template records the CPU its snapshot was made on, and its clones are
always started on that one: a process that chose AVX code before the snapshot must find AVX
after a restore (templates made before keep `max`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import InvalidRequest

TCG_CPU = "max,-erms,-fsrm,-avx,-avx2"
LEGACY_CPU = {"tcg": "max", "kvm": "host"}  # what templates recorded before they named their CPU


@dataclass(frozen=True)
class Accelerator:
    """The QEMU arguments and guest kernel arguments that go with one accelerator."""

    name: str
    cpu: str  # QEMU's -cpu: a snapshot restores only on the CPU model it was made on (Template.cpu)
    kernel_args: tuple[str, ...]

    @property
    def qemu_args(self) -> tuple[str, ...]:
        return ("-accel", self.name, "-cpu", self.cpu)

    def on_cpu(self, cpu: str) -> Accelerator:
        """This accelerator with the CPU model a template's snapshot was made on."""
        return self if cpu == self.cpu else replace(self, cpu=cpu)


def host_has_hw_kvm(sys_module: Path = Path("/sys/module")) -> bool:
    """True with hardware virtualisation behind /dev/kvm (not kvm_pvm)."""
    has_module = any((sys_module / m).exists() for m in ("kvm_intel", "kvm_amd"))
    return has_module and os.access("/dev/kvm", os.R_OK | os.W_OK)


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int:
    """The host CPU clock in kHz; under TCG the guest TSC is the host TSC."""
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":", 1)[1]) * 1000)
    return 2_000_000


def choose(setting: str = "auto") -> Accelerator:
    """Resolve `auto|kvm|tcg` to concrete arguments. The same result must serve boot and restore."""
    if setting not in ("auto", "kvm", "tcg"):
        raise InvalidRequest(f"vmm.accelerator must be auto, kvm or tcg, got {setting!r}")
    name = setting
    if setting == "auto":
        name = "kvm" if host_has_hw_kvm() else "tcg"
    if name == "kvm":
        return Accelerator("kvm", "host", ())
    khz = host_tsc_khz()
    return Accelerator("tcg", TCG_CPU, (f"tsc_early_khz={khz}", "tsc=reliable"))
