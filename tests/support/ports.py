"""Loopback ports for the servers tests start (nodes' peer listeners, pouchdb-server, relays).

A port the kernel hands out for `bind(0)` comes from its ephemeral range, which every
outgoing connection of every test process draws from too: between the pick and the server's
listen, another test's connection can take it ("Address already in use", one run in many).
These come from below that range, where no outgoing connection goes, each pytest-xdist worker
from a slice of its own, so two workers never pick the same one; each is checked free by
binding it."""

from __future__ import annotations

import itertools
import os
import random
import socket

LOWEST = 10000  # below: ports well-known services use


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 when it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def worker_slice(worker: int, workers: int, high: int) -> range:
    """Worker `worker`'s (0-based, of `workers`) share of the ports from LOWEST to `high`."""
    size = (high - LOWEST) // max(workers, 1)
    return range(LOWEST + worker * size, LOWEST + (worker + 1) * size)


def _this_worker() -> tuple[int, int]:
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else 0
    return index, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def _candidates() -> itertools.cycle:
    ports = worker_slice(*_this_worker(), ephemeral_low())
    start = random.randrange(len(ports))  # another session running beside: elsewhere
    return itertools.cycle([*ports[start:], *ports[:start]])


_next = _candidates()


def free_loopback_port() -> int:
    """A loopback TCP port nothing listens on now, outside the ephemeral range, not handed
    out before by this process (until its slice wraps around)."""
    for _ in range(1000):
        port = next(_next)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in this worker's slice")
