"""Loopback ports for the servers that benchmarks and tests start themselves."""

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10_000  # below this sit the usual services' ports (Redis, PostgreSQL, ...)


def free_port() -> int:
    """A loopback port free now, outside the kernel's ephemeral range. The server that is to
    listen on it binds it later (after a training run, or again after a restart), and a port
    from that range could meanwhile be given to one of the harness's own outgoing
    connections; one outside it is only ever taken by a bind."""
    first, last = 32_768, 60_999  # Linux's default range, where /proc does not say
    if EPHEMERAL_RANGE.exists():
        first, last = (int(bound) for bound in EPHEMERAL_RANGE.read_text().split())
    candidates = [*range(LOWEST, first), *range(last + 1, 65_536)]
    # Not seeded: any free port will do, and concurrent harnesses should not all try one.
    for port in random.SystemRandom().sample(candidates, 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port outside the ephemeral range in 200 tries")
