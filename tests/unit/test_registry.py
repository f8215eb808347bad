from pathlib import Path

from vmm.model import RamMode, VmRecord, VmState
from vmm.policy import Policy
from vmm.registry import Registry


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
