"""Prometheus metrics of the edge, on a registry of its own (tests make many instances)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vmm.model import VmState

WAKE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0)


class Metrics:
    """Counters the proxy bumps per request; label children are cached off the hot path."""

    def __init__(self, vm_states: Callable[[], Mapping[str, int]] | None = None) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter("mvm_requests", "HTTP responses by status.", ["status"], registry=self.registry)
        self._by_status: dict[int, Counter] = {}
        wakes = Counter("mvm_wakes", "VM wakes on request, by result.", ["result"], registry=self.registry)
        self._wake_ok, self._wake_failed = wakes.labels(result="ok"), wakes.labels(result="failed")
        self._wake_seconds = Histogram(
            "mvm_wake_seconds", "Time from request to VM ready.", buckets=WAKE_BUCKETS, registry=self.registry
        )
        self._held = Gauge("mvm_held_requests", "Requests waiting for a VM to wake.", registry=self.registry)
        traffic = Counter(
            "mvm_proxied_bytes", "Bytes relayed, up (to VMs) and down.", ["direction"], registry=self.registry
        )
        self._up, self._down = traffic.labels(direction="up"), traffic.labels(direction="down")
        egress = Counter(
            "mvm_egress_attempts",
            "Guests' outbound connections via the egress proxy, by decision.",
            ["decision"],
            registry=self.registry,
        )
        self._egress_allowed, self._egress_denied = egress.labels(decision="allowed"), egress.labels(decision="denied")
        self._clients = Gauge("mvm_client_connections", "Open client connections.", registry=self.registry)
        self._refused = Counter(
            "mvm_connections_refused", "Client connections refused on arrival, by reason.", ["reason"],
            registry=self.registry,
        )  # fmt: skip
        self._slow = Counter(
            "mvm_slow_clients", "Requests cut because their body came too slowly (408).", registry=self.registry
        )
        if vm_states is not None:
            self.registry.register(_VmStates(vm_states))

    def request(self, status: int) -> None:
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = self._requests.labels(status=str(status))
        child.inc()

    def wake(self, seconds: float, ok: bool) -> None:
        (self._wake_ok if ok else self._wake_failed).inc()
        self._wake_seconds.observe(seconds)

    def held(self, delta: int) -> None:
        self._held.inc(delta)

    def client_connections(self, delta: int) -> None:
        self._clients.inc(delta)

    def connection_refused(self, reason: str) -> None:
        self._refused.labels(reason=reason).inc()

    def slow_client(self) -> None:
        self._slow.inc()

    def proxied(self, upstream_bytes: int, downstream_bytes: int) -> None:
        if upstream_bytes:
            self._up.inc(upstream_bytes)
        if downstream_bytes:
            self._down.inc(downstream_bytes)

    def egress(self, allowed: bool) -> None:
        (self._egress_allowed if allowed else self._egress_denied).inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _VmStates(Collector):
    """mvm_vms{state}: read at scrape time; every state is listed, zeros included."""

    def __init__(self, vm_states: Callable[[], Mapping[str, int]]) -> None:
        self._vm_states = vm_states

    def collect(self) -> Iterator[Metric]:
        counts = dict.fromkeys((s.value for s in VmState), 0)
        counts.update(self._vm_states())
        family = GaugeMetricFamily("mvm_vms", "VMs by state.", labels=["state"])
        for state, count in counts.items():
            family.add_metric([state], count)
        yield family
