"""Fixtures of the simulated-network tests: a lab, a relay in its public namespace, and a
cluster of nodes that stops before the lab is torn down."""

from __future__ import annotations

import pytest

from tests.node.cluster import Cluster
from tests.support.netlab import netlab
from tests.support.relay_nodes import relay_log, start_relay


@pytest.fixture
def lab():
    with netlab(hosts_per_home=(2, 2)) as made:
        yield made


@pytest.fixture
def relay(lab, tmp_path):
    running = start_relay(lab.public, tmp_path / "relay" / "relay.key")
    yield running
    running.stop()
    print("===== relay =====\n" + relay_log(running)[-6000:])


@pytest.fixture
def cluster(lab, tmp_path):
    """Nodes under tmp_path, stopped before the lab goes (their logs shown on failure)."""
    made = Cluster(tmp_path / "nodes")
    try:
        yield made
    finally:
        made.close()
        print(made.logs())
