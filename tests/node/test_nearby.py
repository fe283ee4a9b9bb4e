"""Nodes found on the LAN show in `plugshare peers` before any share (issue #11 item 11),
marked as nearby rather than as peers. Two real nodes announcing with zeroconf on loopback."""

from __future__ import annotations

import json

import pytest

from tests.node.cluster import wait_until
from tests.node.conftest import plugshare, start_node


def init_discovering(home, name: str) -> str:
    done = plugshare(home, "--json", "init", "--name", name, "--api-listen", "127.0.0.1:0",
                     "--peer-listen", "127.0.0.1:0")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)["node_id"]


@pytest.fixture
def two_discovering_nodes(tmp_path):
    homes = {name: tmp_path / name for name in ("nearby-a", "nearby-b")}
    ids = {name: init_discovering(home, name) for name, home in homes.items()}
    nodes = {name: start_node(home) for name, home in homes.items()}
    try:
        yield nodes, ids
    finally:
        for node in nodes.values():
            node.stop()


def test_a_node_on_the_lan_is_listed_as_nearby_before_any_share(two_discovering_nodes):
    nodes, ids = two_discovering_nodes
    a = nodes["nearby-a"]

    def nearby() -> list:
        done = a.cli("--json", "peers")
        assert done.returncode == 0, done.stdout
        answer = json.loads(done.stdout)
        return [n for n in answer.get("nearby", []) if n["id"] == ids["nearby-b"]]

    (found,) = wait_until(nearby, 30, what="nearby-b among nearby-a's nearby nodes")
    assert found["name"] == "nearby-b" and found["addresses"]
    peers = json.loads(a.cli("--json", "peers").stdout)["peers"]
    assert ids["nearby-b"] not in [p["id"] for p in peers]  # not a peer: nothing shared
    text = a.cli("peers").stdout
    assert "nearby-b" in text and "nearby" in text
    assert "(no peers yet)" not in text or "nearby-b" in text.split("(no peers yet)")[1]
