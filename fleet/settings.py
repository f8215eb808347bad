"""The fleet's settings: the [catalog] and [cluster] sections, filled by `mvm.config`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edge.settings import EdgeConfig

DEV_CLUSTER_SECRET = "dev-cluster-secret-change-me-0123456789"
MIN_CLUSTER_SECRET = 32


@dataclass(frozen=True)
class CatalogConfig:
    url: str = field(default="", repr=False)  # "": the embedded SQLite catalog in vmm.state_dir


@dataclass(frozen=True)
class ClusterConfig:
    """How VM hosts and edge workers find and trust each other (`mvm host`, `mvm edge`)."""

    secret: str = field(default=DEV_CLUSTER_SECRET, repr=False)  # bearer key of host APIs and data ports
    host_id: str = ""  # "": this machine's hostname
    host_listen: str = "127.0.0.1:9100"  # the host API of `mvm host`
    data_listen: str = "127.0.0.1:9101"  # the data port: edges on other machines tunnel to guests through it
    advertise: str = ""  # the address edges use for this host; "": its host_listen's address
    heartbeat_interval: float = 1.0
    down_after: float = 5.0  # seconds without a heartbeat before a host's VMs show as unavailable
    direct: bool = True  # an edge reaches guests on its own machine in their namespace (False: via data ports)
    tls: bool = False  # mutual TLS on the host API and data port; False (plaintext) is refused beyond loopback
    ca_file: Path = Path("var/cluster/ca.crt")  # the CAs a host or edge trusts (old and new during a rotation)
    host_cert: Path = Path("var/cluster/host.crt")  # `mvm host`: its certificate (serverAuth) and key
    host_key: Path = Path("var/cluster/host.key")
    edge_cert: Path = Path("var/cluster/edge.crt")  # `mvm edge`: its certificate (clientAuth) and key
    edge_key: Path = Path("var/cluster/edge.key")


class FleetConfig(EdgeConfig, Protocol):
    """What a VM host and an edge worker of a fleet read: the edge's sections plus the fleet's own."""

    @property
    def catalog(self) -> CatalogConfig: ...
    @property
    def cluster(self) -> ClusterConfig: ...
