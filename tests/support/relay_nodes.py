"""Real nodes around a real relay on a simulated network (tests/support/netlab.py), for
tests/net/: `plugshare relay` in the public namespace (`start_relay`), nodes placed on lab hosts
and joined to relays (`add_node`), and what the tests ask of them. The fixtures (`lab`,
`relay`, `cluster`) are in tests/net/conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

from plugshare.sharing.invitation import Invitation
from tests.node.cluster import Cluster, ClusterNode, wait_until
from tests.relay.processes import RelayProcess, behind_nat
from tests.support.netlab import Host, Netlab

LONG = 120.0  # generous: real processes, TCP timeouts on dropped SYNs, a loaded machine


def start_relay(public: Host, key: Path) -> RelayProcess:
    """`plugshare relay` in the public namespace, on its address (tests/relay/processes.py's
    RelayProcess: `stop` kills it, `start` brings it back with the same key and port)."""
    key.parent.mkdir(parents=True, exist_ok=True)
    return RelayProcess(key, public.free_port(), host=public.address,
                        prefix=tuple(public.command_prefix)).start()


def relay_log(relay: RelayProcess) -> str:
    path = relay.key.parent / "relay.log"
    return path.read_text() if path.exists() else ""


def relay_id(relay: RelayProcess) -> str:
    return relay.address.partition("@")[0]


def add_node(cluster: Cluster, name: str, host: Host, relay_address: str, *,
             advertise_direct: bool = True) -> ClusterNode:
    """A node at `host` joined to the relay at `relay_address`; everything else as
    `plugshare init` makes it
    (`advertise_direct=False`: it tells peers no direct address, so they go straight to
    its relays instead of first waiting out a dial its router drops)."""
    node = cluster.add(name, place=host, start=False)
    behind_nat(node, relay_address, advertise_direct=advertise_direct)
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
