"""A big session (issue 17): a python-sandbox VM with 4 GiB of RAM suspends and restores with its data.

Its image is the python-sandbox image at 4096 MiB (bench.big_session.add_big_image: what `mvm image build
--memory-mb 4096` makes of the same Dockerfile, with the built files linked). The guest holds a few hundred
MiB of Python objects, not gigabytes, so that the test stays short under TCG; its RAM file stays sparse.
"""

from __future__ import annotations

from dataclasses import replace

from bench.big_session import BIG_IMAGE, add_big_image
from tests.e2e.conftest import BOOT_TIMEOUT, started_manager
from tests.e2e.guest import sandbox_run
from vmm.model import RamMode, VmState
from vmm.settings import VmmSettings

BIG_MB = 4096
DATA_MIB = 256
RUN_TIMEOUT = 180.0  # filling and hashing DATA_MIB under TCG on a shared machine

FILL = f"""
import hashlib, os
big = {{"blocks": [os.urandom(1 << 20) for _ in range({DATA_MIB})], "names": [str(i) * 100 for i in range(100_000)]}}
def digest():
    h = hashlib.sha256()
    for block in big["blocks"]:
        h.update(block)
    h.update("".join(big["names"]).encode())
    return h.hexdigest()
digest()
"""


def own_images_and_templates(settings: VmmSettings) -> VmmSettings:
    """The test's state directory with images of its own (the built ones plus BIG_IMAGE) and templates of its
    own, instead of the session's shared ones (a 4 GiB template is this test's alone)."""
    add_big_image(settings.state_dir / "images", BIG_MB)
    (settings.state_dir / "templates").unlink()
    return replace(settings, boot_timeout=BOOT_TIMEOUT)


async def test_a_4_gib_vm_suspends_and_restores_with_its_data(settings: VmmSettings) -> None:
    big = own_images_and_templates(settings)
    async with started_manager(big) as manager:
        tpl = await manager.create_template("big", BIG_IMAGE, lambda _: None)
        assert tpl.memory_mb == BIG_MB
        vm = await manager.create_vm("big")
        guest_memory = "import os\nos.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')"
        assert await sandbox_run(vm.id, guest_memory) > (BIG_MB - 256) << 20, "the guest has its 4 GiB"
        held = await sandbox_run(vm.id, FILL, RUN_TIMEOUT)
        for round_no in range(2):  # the first suspend moves RAM out of the template's mapping; later ones do not
            await manager.suspend(vm.id)
            assert vm.state is VmState.SUSPENDED and vm.pid is None and vm.ram_mode is RamMode.OWN_FILE
            vm_dir = manager.vm_dir(vm.id)
            ram = vm_dir / "ram"
            assert ram.stat().st_size == BIG_MB << 20
            assert ram.stat().st_blocks * 512 < (BIG_MB << 20) // 2, "the RAM file holds what the guest touched"
            assert (vm_dir / "state").stat().st_size < 1024**2, "a wake loads device state only"
            assert await manager.ensure_running(vm.id) is True
            assert await sandbox_run(vm.id, "digest()", RUN_TIMEOUT) == held, f"data after restore {round_no + 1}"
