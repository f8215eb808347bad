from prometheus_client.parser import text_string_to_metric_families

from edge.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_counters_gauge_and_histogram() -> None:
    m = Metrics()
    for status in (200, 200, 404, 503):
        m.request(status)
    m.wake(0.3, ok=True)
    m.wake(12.0, ok=False)
    m.held(3)
    m.held(-1)
    m.proxied(100, 2000)
    m.proxied(0, 5)
    s = samples(m)
    assert s[("mvm_requests_total", (("status", "200"),))] == 2
    assert s[("mvm_requests_total", (("status", "404"),))] == 1
    assert s[("mvm_requests_total", (("status", "503"),))] == 1
    assert s[("mvm_wakes_total", (("result", "ok"),))] == 1
    assert s[("mvm_wakes_total", (("result", "failed"),))] == 1
    assert s[("mvm_wake_seconds_count", ())] == 2
    assert s[("mvm_wake_seconds_bucket", (("le", "0.5"),))] == 1
    assert s[("mvm_wake_seconds_bucket", (("le", "30.0"),))] == 2
    assert s[("mvm_wake_seconds_bucket", (("le", "0.05"),))] == 0
    assert s[("mvm_held_requests", ())] == 2
    assert s[("mvm_proxied_bytes_total", (("direction", "up"),))] == 100
    assert s[("mvm_proxied_bytes_total", (("direction", "down"),))] == 2005


def test_vm_states_are_read_at_scrape_time_with_zeros() -> None:
    states = {"running": 2}
    m = Metrics(lambda: states)
    assert samples(m)[("mvm_vms", (("state", "running"),))] == 2
    states = {"running": 1, "suspended": 4}
    s = samples(m)
    assert s[("mvm_vms", (("state", "running"),))] == 1
    assert s[("mvm_vms", (("state", "suspended"),))] == 4
    assert s[("mvm_vms", (("state", "failed"),))] == 0


def test_instances_do_not_share_a_registry() -> None:
    a, b = Metrics(), Metrics()
    a.request(200)
    assert ("mvm_requests_total", (("status", "200"),)) not in samples(b)
    assert ("mvm_vms", (("state", "running"),)) not in samples(b)  # no vm_states callback


def test_per_vm_series_only_when_switched_on_read_at_scrape_time() -> None:
    from vmm.usage import VmUsage

    now: list[VmUsage] = [VmUsage("vma", "running", 0.0, 2.5, 50.0, 100, 200, 300, 4096, 10, 20)]
    assert not any(name.startswith("mvm_vm_") for name, _ in samples(Metrics(lambda: {})))
    m = Metrics(lambda: {}, lambda: now)
    s = samples(m)
    assert s[("mvm_vm_cpu_seconds", (("vm", "vma"),))] == 2.5
    assert s[("mvm_vm_cpu_percent", (("vm", "vma"),))] == 50.0
    assert s[("mvm_vm_memory_bytes", (("vm", "vma"),))] == 100
    assert s[("mvm_vm_memory_peak_bytes", (("vm", "vma"),))] == 200
    assert s[("mvm_vm_disk_bytes", (("vm", "vma"),))] == 4096
    assert s[("mvm_vm_net_rx_bytes", (("vm", "vma"),))] == 10
    assert s[("mvm_vm_net_tx_bytes", (("vm", "vma"),))] == 20
    now.clear()  # the VM is gone: so are its series
    assert not any(name.startswith("mvm_vm_") for name, _ in samples(m))
