import pytest

from vmm.errors import InvalidRequest
from vmm.policy import Policy


def test_defaults_have_eight_hour_lifetime() -> None:
    assert Policy().max_lifetime == 8 * 3600


def test_merges_over_base_and_normalises_ports() -> None:
    base = Policy(idle_suspend_after=60, ports=(8081,))
    pol = Policy.from_dict({"idle_pause_after": 5, "ports": [9000, 8081, 9000]}, base=base)
    assert pol.idle_pause_after == 5 and pol.idle_suspend_after == 60 and pol.ports == (8081, 9000)
    assert Policy.from_dict(pol.to_dict()) == pol


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"idle_suspend_after": -1}, "policy.idle_suspend_after"),
        ({"idle_pause_after": "soon"}, "policy.idle_pause_after"),
        ({"memory_mb": 10}, "policy.memory_mb"),
        ({"vcpus": True}, "policy.vcpus"),
        ({"ports": [70000]}, "policy.ports[]"),
        ({"ports": 80}, "policy.ports"),
        ({"colour": "red"}, "policy.colour"),
        ({"idle_pause_after": 100, "idle_suspend_after": 10}, "policy.idle_suspend_after"),
        ({"auto_resume": "no"}, "policy.auto_resume"),
        ({"suspended_ttl": -1}, "policy.suspended_ttl"),
    ],
)
def test_errors_name_the_key(data: dict, key: str) -> None:
    with pytest.raises(InvalidRequest, match=key.replace("[", r"\[").replace("]", r"\]")):
        Policy.from_dict(data)


def test_null_disables_a_step() -> None:
    assert Policy.from_dict({"max_lifetime": None}).max_lifetime is None


def test_max_lifetime_is_capped_when_a_cap_is_set() -> None:
    assert Policy.from_dict({"max_lifetime": 3600}, max_lifetime_cap=7200).max_lifetime == 3600
    for too_long in (7201, None):
        with pytest.raises(InvalidRequest, match=r"at most 7200 s \(vmm.max_lifetime_cap\)"):
            Policy.from_dict({"max_lifetime": too_long}, max_lifetime_cap=7200)
