"""Real nodes around a real relay on a simulated network (tests/support/netlab.py), for
tests/net/: `plugshare relay` in the public namespace (`Relay`), nodes placed on lab hosts
and joined to relays (`add_node`), and what the tests ask of them. The fixtures (`lab`,
`relay`, `cluster`) are in tests/net/conftest.py."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import tomli_w

from plugshare.sharing.invitation import Invitation
from tests.node.cluster import Cluster, ClusterNode, wait_until
from tests.support.netlab import Host, Netlab

LONG = 120.0  # generous: real processes, TCP timeouts on dropped SYNs, a loaded machine


class Relay:
    """`plugshare relay` in the public namespace, on its address; restartable with the same
    key and port."""

    def __init__(self, public: Host, key: Path):
        self.public, self.key = public, key
        self.port = public.free_port()
        self.process: subprocess.Popen | None = None
        self.address = ""  # ID@HOST:PORT, as it prints it
        self.log_file = key.parent / "relay.log"  # its stderr, shown when a test fails
        key.parent.mkdir(parents=True, exist_ok=True)

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def start(self) -> Relay:
        with open(self.log_file, "a") as log:
            self.process = subprocess.Popen(
                [*self.public.command_prefix, sys.executable, "-m", "plugshare", "relay", "-v",
                 "--listen", f"{self.public.address}:{self.port}", "--key", str(self.key)],
                stdout=subprocess.PIPE, stderr=log, text=True)
        line = self.process.stdout.readline()
        assert line.startswith("relay "), f"the relay printed {line!r}: {self.log()}"
        self.address = line.split()[1]
        return self

    @property
    def relay_id(self) -> str:
        return self.address.partition("@")[0]

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)
            self.process = None


def add_node(cluster: Cluster, name: str, host: Host, relays: list[str], *,
             advertise_direct: bool = True) -> ClusterNode:
    """A node at `host` joined to `relays`; everything else as `plugshare init` makes it
    (`advertise_direct=False`: it tells peers no direct address, so they go straight to
    its relays instead of first waiting out a dial its router drops)."""
    node = cluster.add(name, place=host, start=False)
    path = node.home / "node.toml"
    config = tomllib.loads(path.read_text())
    config.setdefault("peer", {}).update(relays=relays, advertise_direct=advertise_direct)
    path.write_text(tomli_w.dumps(config))
    return node.start()


def peer_row(node: ClusterNode, other: ClusterNode) -> dict | None:
    return next((p for p in node.api("GET", "/peers")["peers"] if p["id"] == other.node_id), None)


def linked_via(node: ClusterNode, other: ClusterNode, via: str) -> bool:
    row = peer_row(node, other)
    return bool(row and row["connected"] and row["via"] == via)


def has(node: ClusterNode, doc_id: str, title: str) -> bool:
    doc = node.get(doc_id)
    return bool(doc and doc.get("title") == title)


def share_across(owner: ClusterNode, member: ClusterNode, lab: Netlab) -> Invitation:
    """`share create` + `share invite` at the owner, `share accept` at the member: accepted
    at once (not left pending), although the owner's direct address is unreachable."""
    owner.cli_json("share", "create", "notes", "--doctype", "io.notes")
    code = owner.cli_json("share", "invite", "notes")["code"]
    accepted = member.cli("--json", "share", "accept", "--no-progress", code)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    answer = json.loads(accepted.stdout)
    assert not str(answer.get("state", "")).startswith("pending"), answer
    return Invitation.decode(code)


def sync_both_ways(one: ClusterNode, other: ClusterNode, tag: str) -> None:
    one.put("io.notes", {"title": f"{tag} from {one.name}"}, f"{tag}-{one.name}")
    other.put("io.notes", {"title": f"{tag} from {other.name}"}, f"{tag}-{other.name}")
    wait_until(lambda: has(other, f"{tag}-{one.name}", f"{tag} from {one.name}"), LONG,
               what=f"{one.name}'s {tag} note at {other.name}")
    wait_until(lambda: has(one, f"{tag}-{other.name}", f"{tag} from {other.name}"), LONG,
               what=f"{other.name}'s {tag} note at {one.name}")
