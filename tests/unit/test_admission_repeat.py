"""A keep-alive client's repeated head is admitted from the connection's cache: the same verdict
while the VM's record is as it was, a new one as soon as what the verdict took from it changed."""

from __future__ import annotations

from edge.admission import Admission, Admitter
from edge.hostnames import HostnameRouter
from edge.reqhead import RequestHead
from edge.tokens import SigningKey, TokenService
from tests.unit.proxy_harness import CONTROL, DOMAIN, SECRET, VM, FakeBackend
from vmm.model import VmState


def _admit_twice_then(change: str) -> tuple[Admission, Admission, Admission]:
    backend = FakeBackend()
    rec = backend.add_vm(VM, 0)
    tokens = TokenService([SigningKey("k1", "HS256", secret=SECRET)], "k1")
    admitter = Admitter(backend, HostnameRouter(DOMAIN, CONTROL), tokens, b"203.0.113.9", b"https")
    head = RequestHead()
    head.add(b"Host", f"{VM}.{DOMAIN}".encode())
    head.add(b"Authorization", f"Bearer {tokens.issue(VM)[0]}".encode())

    def admit() -> Admission:
        verdict = admitter.admit(b"GET", b"/", "1.1", head, False)
        assert isinstance(verdict, Admission)
        return verdict

    first, second = admit(), admit()
    if change == "suspended":
        rec.state = VmState.SUSPENDED
    elif change == "restored":
        rec.generation += 1
    elif change == "h2c":
        rec.h2c_ports = (rec.app_port,)
    return first, second, admit()


def test_the_same_head_again_gets_the_same_verdict() -> None:
    first, second, third = _admit_twice_then("nothing")
    assert second is first and third is first
    assert (first.vm_id, first.port, first.running, first.h2c) == (VM, 8080, True, False)


def test_a_sleeping_vm_a_new_generation_or_an_h2c_port_make_a_new_verdict() -> None:
    _, _, asleep = _admit_twice_then("suspended")
    assert not asleep.running
    first, _, restored = _admit_twice_then("restored")
    assert restored.generation == first.generation + 1 and restored.head == first.head
    _, _, h2c = _admit_twice_then("h2c")
    assert h2c.h2c
