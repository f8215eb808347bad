"""vmm/reflink.py without a reflink filesystem: which runs of pages a compaction shares again or punches
out, and a clear refusal where reflinks are missing (the e2e test runs it on a loop-mounted XFS)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.fake_runtime import FakeRuntime
from vmm import reflink
from vmm.errors import VmmError
from vmm.manager import VmManager
from vmm.settings import VmmSettings

P = reflink.PAGE


def test_a_chunk_is_compacted_in_runs_zero_pages_punched_equal_pages_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int, int]] = []
    monkeypatch.setattr(reflink, "_punch", lambda fd, off, n: calls.append(("punch", off, n)) or n)
    monkeypatch.setattr(reflink, "_dedupe", lambda src, dst, off, n: calls.append(("dedupe", off, n)) or n)
    same, changed, zero = b"a" * P, b"b" * P, bytes(P)
    mine = zero + same + same + changed + zero + zero + same
    theirs = same + same + same + same + same + zero + same
    given = reflink._compact_chunk(3, 4, 1 << 20, mine, theirs)
    base = 1 << 20
    assert calls == [
        ("punch", base, P),
        ("dedupe", base + P, 2 * P),
        ("punch", base + 4 * P, 2 * P),
        ("dedupe", base + 6 * P, P),
    ]
    assert given == 6 * P  # all but the changed page


def test_no_reflinks_here_is_said_plainly(tmp_path: Path) -> None:
    source = tmp_path / "ram"
    source.write_bytes(b"x" * P)
    if reflink.supported(tmp_path):
        pytest.skip("this temporary directory has reflinks")
    with pytest.raises(VmmError, match="no reflinks"):
        reflink.clone(source, tmp_path / "copy")
    assert not (tmp_path / "copy").exists(), "a failed clone leaves no file behind"


async def test_a_manager_asked_for_reflinks_where_there_are_none_refuses_to_start(tmp_path: Path) -> None:
    if reflink.supported(tmp_path):
        pytest.skip("this temporary directory has reflinks")
    settings = VmmSettings(state_dir=tmp_path, clone_ram="reflink")
    with pytest.raises(VmmError, match=r'vmm\.clone_ram = "reflink": the state directory .* has no reflinks'):
        await VmManager(settings, runtime=FakeRuntime(settings)).start()
