"""The harness's loopback ports stay out of the range the kernel gives outgoing connections."""

import socket
from pathlib import Path

import pytest

from benchmarks import ports
from benchmarks.ports import LOWEST, free_port


def test_free_port_is_outside_the_ephemeral_range_and_can_be_bound() -> None:
    first, last = (int(bound) for bound in ports.EPHEMERAL_RANGE.read_text().split())
    for _ in range(20):
        port = free_port()
        assert port >= LOWEST
        assert not first <= port <= last
        with socket.socket() as server:
            server.bind(("127.0.0.1", port))


def test_free_port_follows_the_kernels_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configured = tmp_path / "ip_local_port_range"
    configured.write_text("10000\t65000\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", configured)
    assert all(free_port() > 65_000 for _ in range(20))
