"""`mvm.port.<n>.protocol` labels: h2c ports found, bad labels refused naming the label."""

from __future__ import annotations

import pytest

from vmm.errors import InvalidRequest
from vmm.port_protocols import h2c_ports


def test_h2c_ports_come_from_labels() -> None:
    labels = {"mvm.port.50051.protocol": "h2c", "mvm.port.8080.protocol": "http", "mvm.ready": "tcp"}
    assert h2c_ports(labels, (8080, 50051, 9000)) == (50051,)
    assert h2c_ports({}, (8080,)) == ()


@pytest.mark.parametrize(
    ("labels", "said"),
    [
        ({"mvm.port.50051.protocol": "h3"}, "must be one of http, h2c"),
        ({"mvm.port.7000.protocol": "h2c"}, "names no port of the image"),
        ({"mvm.port.x.protocol": "h2c"}, "names no port of the image"),
        ({"mvm.port.050051.protocol": "h2c"}, "names no port of the image"),
    ],
)
def test_bad_labels_are_refused_naming_the_label(labels: dict[str, str], said: str) -> None:
    with pytest.raises(InvalidRequest, match=said) as err:
        h2c_ports(labels, (8080, 50051))
    assert next(iter(labels)) in str(err.value)


def test_the_port_protocol_flag_becomes_build_options() -> None:
    from mvm.cli import CliError, _build_options, _parser

    args = _parser().parse_args(["image", "build", "--dockerfile", "Dockerfile", "--port-protocol", "50051=h2c"])
    assert _build_options(args).port_protocols == {50051: "h2c"}
    bad = _parser().parse_args(["image", "build", "--dockerfile", "Dockerfile", "--port-protocol", "h2c"])
    with pytest.raises(CliError, match="--port-protocol 'h2c': must be PORT=PROTO"):
        _build_options(bad)
