from vmm.model import VmRecord, VmState
from vmm.policy import Policy
from vmm.reaper import ReapAction, due_action

NOW = 10_000.0


def _rec(state: VmState, idle: float, age: float = 100.0, **policy: float | None) -> VmRecord:
    return VmRecord("vabcdefghijk", "demo", state, Policy(**policy), 8080, NOW - age, NOW - idle)


def test_pause_then_suspend_by_idle_time() -> None:
    pol = {"idle_pause_after": 10.0, "idle_suspend_after": 60.0}
    assert due_action(_rec(VmState.RUNNING, 5, **pol), NOW, 0) is None
    assert due_action(_rec(VmState.RUNNING, 11, **pol), NOW, 0) is ReapAction.PAUSE
    assert due_action(_rec(VmState.PAUSED, 11, **pol), NOW, 0) is None
    assert due_action(_rec(VmState.PAUSED, 61, **pol), NOW, 0) is ReapAction.SUSPEND
    assert due_action(_rec(VmState.SUSPENDED, 1000, **pol), NOW, 0) is None


def test_open_streams_keep_a_vm_awake_but_not_past_its_lifetime() -> None:
    assert due_action(_rec(VmState.RUNNING, 1000, idle_suspend_after=60.0), NOW, 1) is None
    assert due_action(_rec(VmState.RUNNING, 0, age=9000, max_lifetime=3600.0), NOW, 3) is ReapAction.DELETE
    assert due_action(_rec(VmState.SUSPENDED, 0, age=9000, max_lifetime=3600.0), NOW, 0) is ReapAction.DELETE


def test_disabled_steps_never_fire() -> None:
    rec = _rec(VmState.RUNNING, 10**6, age=10**6, idle_pause_after=None, idle_suspend_after=None, max_lifetime=None)
    assert due_action(rec, NOW, 0) is None


def test_a_vm_suspended_past_its_ttl_is_terminated() -> None:
    rec = _rec(VmState.SUSPENDED, 5000, suspended_ttl=3600.0, idle_suspend_after=None)
    rec.state_changed_at = NOW - 3599
    assert due_action(rec, NOW, 0) is None
    rec.state_changed_at = NOW - 3600
    assert due_action(rec, NOW, 0) is ReapAction.DELETE
    rec.state = VmState.RUNNING  # only time spent suspended counts
    assert due_action(rec, NOW, 0) is None


def test_a_vm_just_woken_is_not_idle_from_before_it_slept() -> None:
    """Its waker (a held request, an exec) may not have touched it yet: the reaper must not put it back."""
    rec = _rec(VmState.RUNNING, 1000, idle_suspend_after=60.0)
    rec.state_changed_at = NOW - 1  # restored a second ago
    assert due_action(rec, NOW, 0) is None
    rec.state_changed_at = NOW - 60
    assert due_action(rec, NOW, 0) is ReapAction.SUSPEND
    rec.state, rec.state_changed_at = VmState.PAUSED, NOW - 1  # paused because idle: its idle time goes on
    assert due_action(rec, NOW, 0) is ReapAction.SUSPEND
