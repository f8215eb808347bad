"""Prometheus metrics of the edge, on a registry of its own (tests make many instances).

In a set of processes (`mvm serve` with workers, `mvm edge --workers N`) each process
counts what it sees: the workers their requests and connections, the host its guests'
egress. Their supervisor then sets PROMETHEUS_MULTIPROC_DIR (`fleet.run_dir`), so that
prometheus_client writes every value to a per-process file there, and `/metrics`, answered
by whichever worker the scrape lands on, sums the files of the whole machine. Live gauges
(held requests, open connections) count only processes still running. A process on its
own keeps plain in-memory values.

The per-request and per-connection counts are the hot ones: an update of a prometheus_client
value costs a lock (and in a file a pid check and a write), several Python calls, and once
per answer that is a measurable share of a proxied request. They are kept as plain numbers
and handed to their metrics in batches: whenever the registry is read in a process on its own,
and in a worker of a set every second (`flush_every`), so they reach its file at most a second
late, and at once when it answers a scrape itself or stops. A process of a set that does not
batch on a timer writes each count through to its file at once, since other processes read it.
Each protocol's share of the answers (`mvm_requests_by_protocol{protocol="h1"|"h2"}`) is the sum
of its batch, not a count of its own.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from vmm.model import VmState
from vmm.usage import VmUsage

WAKE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0)


def shared_dir() -> str | None:
    """Where this process's values go when it is one of a set: prometheus_client chose file
    backed values at import because PROMETHEUS_MULTIPROC_DIR was set."""
    if getattr(prometheus_values.ValueClass, "_multiprocess", False):
        return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
    return None


class Metrics:
    """Counters the proxy bumps per request; label children are cached off the hot path."""

    def __init__(
        self,
        vm_states: Callable[[], Mapping[str, int]] | None = None,
        vm_usage: Callable[[], Iterable[VmUsage]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        # First: every read of the registry hands over the batch before the metrics are read.
        self.registry.register(_FlushOnRead(self))
        self._requests = Counter("mvm_requests", "HTTP responses by status.", ["status"], registry=self.registry)
        self._by_status: dict[int, Counter] = {}
        protocols = Counter(
            "mvm_requests_by_protocol", "HTTP responses by the client's protocol (h1, h2).", ["protocol"],
            registry=self.registry,
        )  # fmt: skip
        self._h1, self._h2 = protocols.labels(protocol="h1"), protocols.labels(protocol="h2")
        self._h2_streams = Gauge(
            "mvm_h2_streams", "Open HTTP/2 client streams.", registry=self.registry, multiprocess_mode="livesum"
        )
        self._h2_resets = Counter(
            "mvm_h2_resets", "HTTP/2 streams reset (RST_STREAM), by who or which limit.", ["reason"],
            registry=self.registry,
        )  # fmt: skip
        self._h2_goaways = Counter(
            "mvm_h2_goaways", "HTTP/2 connections ended by the edge (GOAWAY), by reason.", ["reason"],
            registry=self.registry,
        )  # fmt: skip
        wakes = Counter("mvm_wakes", "VM wakes on request, by result.", ["result"], registry=self.registry)
        self._wake_ok, self._wake_failed = wakes.labels(result="ok"), wakes.labels(result="failed")
        self._wake_seconds = Histogram(
            "mvm_wake_seconds", "Time from request to VM ready.", buckets=WAKE_BUCKETS, registry=self.registry
        )
        self._held = Gauge(
            "mvm_held_requests", "Requests waiting for a VM to wake.", registry=self.registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        traffic = Counter(
            "mvm_proxied_bytes", "Bytes relayed, up (to VMs) and down.", ["direction"], registry=self.registry
        )
        self._bytes_up, self._bytes_down = traffic.labels(direction="up"), traffic.labels(direction="down")
        egress = Counter(
            "mvm_egress_attempts",
            "Guests' outbound connections via the egress proxy, by decision.",
            ["decision"],
            registry=self.registry,
        )
        self._egress_allowed, self._egress_denied = egress.labels(decision="allowed"), egress.labels(decision="denied")
        hooks = Counter(
            "mvm_webhook_events", "Lifecycle events sent to webhooks, by result: delivered, retried (an attempt that"
            " failed and is tried again), failed (given up after its attempts), dropped (its queue was full).",
            ["result"], registry=self.registry,
        )  # fmt: skip
        self._webhook = {r: hooks.labels(result=r) for r in ("delivered", "retried", "failed", "dropped")}
        self._clients = Gauge(
            "mvm_client_connections", "Open client connections.", registry=self.registry, multiprocess_mode="livesum"
        )
        self._refused = Counter(
            "mvm_connections_refused", "Client connections refused on arrival, by reason.", ["reason"],
            registry=self.registry,
        )  # fmt: skip
        self._slow = Counter(
            "mvm_slow_clients", "Requests cut because their body came too slowly (408).", registry=self.registry
        )
        # VM states are read from the answering process's view (the manager, or a worker's
        # catalog routes) at scrape time, never summed across processes.
        self._vm_states = _VmStates(vm_states) if vm_states is not None else None
        self._exposed = self.registry
        self.shared = shared_dir()
        if self.shared is not None:
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed, self.shared)
        if self._vm_states is not None:
            self._exposed.register(self._vm_states)
        if vm_usage is not None:  # [server] per_vm_metrics: series per VM, read from the manager at scrape time
            self._exposed.register(_VmUsage(vm_usage))
        self.timed = False  # the batch waits for `flush_every`'s timer (or a scrape), not for any read
        self._write_through = self.shared is not None  # other processes read the file: no batch waits
        self._flusher: asyncio.TimerHandle | None = None
        self._pending_status: dict[int, int] = {}  # HTTP/1.1 answers by status
        self._pending_h2: dict[int, int] = {}  # HTTP/2 streams' answers by status
        self._pending_up = self._pending_down = self._pending_clients = 0

    def flush_every(self, seconds: float) -> None:
        """Write the batch every `seconds` (on the running loop) from now on, and not at every read."""
        self.timed = True
        self._write_through = False
        loop = asyncio.get_running_loop()

        def tick() -> None:
            self.flush()
            self._flusher = loop.call_later(seconds, tick)

        self._flusher = loop.call_later(seconds, tick)

    def stop_flushing(self) -> None:
        """Write what is batched, and from now on at every read again (the process is stopping)."""
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        self.flush()
        self.timed = False
        self._write_through = self.shared is not None

    def flush(self) -> None:
        """Hand the batched counts to their metrics."""
        for pending, protocol in ((self._pending_status, self._h1), (self._pending_h2, self._h2)):
            if pending:
                for status, n in pending.items():
                    self._status(status).inc(n)
                protocol.inc(sum(pending.values()))
                pending.clear()
        if self._pending_up:
            self._bytes_up.inc(self._pending_up)
        if self._pending_down:
            self._bytes_down.inc(self._pending_down)
        if self._pending_clients:
            self._clients.inc(self._pending_clients)
        self._pending_up = self._pending_down = self._pending_clients = 0

    def _status(self, status: int) -> Counter:
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = self._requests.labels(status=str(status))
        return child

    def request(self, status: int) -> None:
        """An HTTP/1.1 answer went out (batched)."""
        pending = self._pending_status
        pending[status] = pending.get(status, 0) + 1
        if self._write_through:
            self.flush()

    def request_h2(self, status: int) -> None:
        """An HTTP/2 stream's answer went out (batched)."""
        pending = self._pending_h2
        pending[status] = pending.get(status, 0) + 1
        if self._write_through:
            self.flush()

    def h2_streams(self, delta: int) -> None:
        self._h2_streams.inc(delta)

    def h2_reset(self, reason: str) -> None:
        self._h2_resets.labels(reason=reason).inc()

    def h2_goaway(self, reason: str) -> None:
        self._h2_goaways.labels(reason=reason).inc()

    def wake(self, seconds: float, ok: bool) -> None:
        (self._wake_ok if ok else self._wake_failed).inc()
        self._wake_seconds.observe(seconds)

    def held(self, delta: int) -> None:
        self._held.inc(delta)

    def client_connections(self, delta: int) -> None:
        self._pending_clients += delta
        if self._write_through:
            self.flush()

    def connection_refused(self, reason: str) -> None:
        self._refused.labels(reason=reason).inc()

    def slow_client(self) -> None:
        self._slow.inc()

    def proxied(self, upstream_bytes: int, downstream_bytes: int) -> None:
        self._pending_up += upstream_bytes
        self._pending_down += downstream_bytes
        if self._write_through:
            self.flush()

    def egress(self, allowed: bool) -> None:
        (self._egress_allowed if allowed else self._egress_denied).inc()

    def webhook(self, result: str) -> None:
        """One event's delivery to one webhook: delivered, retried, failed or dropped."""
        self._webhook[result].inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type, for GET /metrics: this process's figures,
        or in a set the sum over all of its processes."""
        self.flush()
        return generate_latest(self._exposed), CONTENT_TYPE_LATEST


class _FlushOnRead(Collector):
    """Yields nothing: reading the registry of a process on its own hands the batch over first."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        if not self._metrics.timed:
            self._metrics.flush()
        return iter(())


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


_PER_VM = (
    ("mvm_vm_cpu_seconds", "CPU time of the VM's QEMU (its cgroup; from 0 again after a restore).", "cpu_seconds"),
    ("mvm_vm_cpu_percent", "CPU % since the VM's previous read (100: one whole CPU).", "cpu_percent"),
    ("mvm_vm_memory_bytes", "Memory of the VM's QEMU now (its cgroup).", "memory_bytes"),
    ("mvm_vm_memory_peak_bytes", "Most memory of the VM's QEMU so far (its cgroup).", "memory_peak_bytes"),
    ("mvm_vm_disk_bytes", "Allocated bytes of the VM's overlay and RAM file.", "disk_bytes"),
    ("mvm_vm_net_rx_bytes", "Bytes the guest sent (its tap's rx counter).", "net_rx_bytes"),
    ("mvm_vm_net_tx_bytes", "Bytes sent to the guest (its tap's tx counter).", "net_tx_bytes"),
)


class _VmUsage(Collector):
    """mvm_vm_*{vm}: each VM's usage (vmm.usage), read at scrape time; one series per VM and figure,
    so off by default ([server] per_vm_metrics)."""

    def __init__(self, vm_usage: Callable[[], Iterable[VmUsage]]) -> None:
        self._vm_usage = vm_usage

    def collect(self) -> Iterator[Metric]:
        families = [(GaugeMetricFamily(name, text, labels=["vm"]), field) for name, text, field in _PER_VM]
        for usage in self._vm_usage():
            for family, field in families:
                family.add_metric([usage.vm], getattr(usage, field))
        for family, _ in families:
            yield family
