from pathlib import Path

import pytest

from vmm.model import RamMode, VmRecord, VmState
from vmm.policy import Policy
from vmm.registry import ProcessIntent, Registry


def test_records_survive_reopening(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.sqlite3")
    rec = VmRecord("vabcdefghijk", "demo", VmState.SUSPENDED, Policy(ports=(8081,)), 8080, 1.0, 2.0)
    rec.ram_mode = RamMode.OWN_FILE
    reg.save(rec)
    rec.last_activity = 5.0
    reg.save_activity([rec])
    reg.close()
    again = Registry(tmp_path / "r.sqlite3").load_all()
    assert again == [rec]


def test_delete_removes_the_record(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.sqlite3")
    reg.save(VmRecord("vabcdefghijk", "demo", VmState.RUNNING, Policy(), 8080, 1.0, 2.0))
    reg.delete("vabcdefghijk")
    assert reg.load_all() == []


def test_process_intents_are_kept_per_vm_and_go_with_it(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.sqlite3")
    reg.add_process(ProcessIntent(4242, "vabcdefghijk", 777, "restore"), 1.0)
    reg.add_process(ProcessIntent(4343, "vabcdefghijk", 778, "ram-move"), 2.0)
    reg.add_process(ProcessIntent(4444, "vzzzzzzzzzzz", 779, "launch"), 3.0)
    reg.remove_process(4343)
    assert reg.processes("vabcdefghijk") == [ProcessIntent(4242, "vabcdefghijk", 777, "restore")]
    reg.delete("vabcdefghijk")
    assert reg.processes("vabcdefghijk") == []
    assert [p.pid for p in reg.processes("vzzzzzzzzzzz")] == [4444]


def test_records_of_earlier_versions_load_with_todays_state_names(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.sqlite3")
    reg.save(VmRecord("vabcdefghijk", "demo", VmState.PENDING, Policy(), 8080, 1.0, 2.0))
    reg.db.execute("UPDATE vms SET state = 'starting'")
    assert reg.load_all()[0].state is VmState.PENDING


async def test_a_stopping_manager_wakes_nothing(tmp_path: Path) -> None:
    from vmm.errors import NotRunning
    from vmm.live import LiveVm
    from vmm.manager import VmManager
    from vmm.settings import VmmSettings

    manager = VmManager(VmmSettings(state_dir=tmp_path))
    rec = VmRecord("vabcdefghijk", "demo", VmState.SUSPENDED, Policy(), 8080, 1.0, 2.0)
    manager.records.add(LiveVm(rec))
    manager.refuse_wakes()
    for explicit in (False, True):
        with pytest.raises(NotRunning, match="not woken while its host stops"):
            await manager.ensure_running(rec.id, explicit=explicit)
    assert rec.state is VmState.SUSPENDED
