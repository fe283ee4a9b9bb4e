"""Relay benchmark, side by side with a direct link in one run (a script, not a test):

    python bench/relay.py [--docs 10000] [--samples 200]

Two `plugshare run` subprocesses on 127.0.0.1 (embedded store, durable writes) and a real
`plugshare relay` process, measured twice with the same code:
  - direct: the nodes reach each other on their peer ports;
  - relay: both nodes are "behind NAT" (`[peer] relays` set, `advertise_direct = false`), so
    the only route between them is the relay; the bench checks that the link says `via relay`.
For each: initial sync of N docs of about 1 KB (docs/s from B's `POST /join` to the last doc
on B), then live propagation, one doc at a time (--samples), a write on each pair in turn so
that both see the same load: from the PUT sent on A to the doc readable through B's API
(polled tightly), p50/p99.
Goals: relay initial sync >= 50% of direct; relay live p50 <= direct p50 + 2 ms.
Prints a table.
"""

from __future__ import annotations

import os.path
import sys

# bench/ holds a `token.py` that would shadow the standard library's `token`: off the path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, _HERE)

from sync import DOCTYPE, Table, make_docs, ms, percentile  # noqa: E402

from tests.node.cluster import Cluster, ClusterNode, wait_until  # noqa: E402
from tests.relay.processes import RelayProcess, behind_nat  # noqa: E402

del sys.path[0]  # bench/ again: only `sync` was wanted from it


def link_via(node: ClusterNode, other: ClusterNode) -> str | None:
    row = next((p for p in node.api("GET", "/peers")["peers"] if p["id"] == other.node_id), None)
    return row["via"] if row and row["connected"] else None


def initial_sync(cluster: Cluster, route: str, n: int, relay: RelayProcess | None,
                 table: Table) -> tuple[float, ClusterNode, ClusterNode]:
    """Fresh nodes A and B; A holds N docs in a share; time B's join until it holds them all.
    Returns docs/s and the nodes, left running for the live measure."""
    a, b = cluster.add("a", start=False), cluster.add("b", start=False)
    for node in (a, b):
        if relay is not None:
            behind_nat(node, relay.address)  # no direct address told: the relay or nothing
        node.start()
    if relay is not None:
        for node in (a, b):
            wait_until(lambda node=node: all(r["joined"] for r in node.status()["relays"]), 90,
                       what=f"{node.name} joined to the relay")
    a.cli_json("share", "create", "bench", "--doctype", DOCTYPE)
    docs = make_docs(n)
    for chunk in range(0, n, 5000):
        a.put_many(DOCTYPE, docs[chunk:chunk + 5000], concurrency=8)
    code = a.api("POST", "/shares/bench/invite", json={"read_only": False})["code"]
    last_id = docs[-1][0]

    started = time.perf_counter()
    b.api("POST", "/join", json={"code": code})
    wait_until(lambda: b.get(last_id), timeout=max(120, n / 50), interval=0.005, what=f"{last_id} on b")
    elapsed = time.perf_counter() - started
    via = link_via(b, a)
    assert via == route, f"the {route} run linked via {via}"
    rate = n / elapsed
    table.add(f"[{route}] initial sync N={n}, accept -> all on B", f"{rate:.0f} docs/s", f"({elapsed:.2f} s)")
    return rate, a, b


def one_write(a: ClusterNode, b: ClusterNode, doc_id: str) -> float:
    """Seconds from the PUT sent on A to the doc readable on B (B's API polled tightly)."""
    sent = time.perf_counter()
    a.put(DOCTYPE, {"title": doc_id, "body": "x" * 900}, doc_id)
    while b.get(doc_id) is None:
        pass
    return time.perf_counter() - sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=10000, help="docs in the initial sync")
    parser.add_argument("--samples", type=int, default=200, help="live latency samples")
    args = parser.parse_args()

    table = Table()
    with tempfile.TemporaryDirectory(prefix="plugshare-bench-relay-") as tmp:
        root = Path(tmp)
        (root / "relay").mkdir()
        relay = RelayProcess(root / "relay" / "relay.key").start()
        direct_cluster, relay_cluster = Cluster(root / "direct"), Cluster(root / "relayed")
        try:
            direct_rate, *direct_pair = initial_sync(direct_cluster, "direct", args.docs, None, table)
            relay_rate, *relay_pair = initial_sync(relay_cluster, "relay", args.docs, relay, table)
            # Live: one write on each pair in turn, so both see the same machine load.
            direct_live, relay_live = [], []
            for i in range(args.samples):
                direct_live.append(one_write(*direct_pair, f"live-{i:04d}"))
                relay_live.append(one_write(*relay_pair, f"live-{i:04d}"))
            for route, latencies in (("direct", direct_live), ("relay", relay_live)):
                table.add(f"[{route}] live: PUT sent on A -> readable on B",
                          f"p50 {ms(statistics.median(latencies))} / p99 {ms(percentile(latencies, 99))} ms",
                          f"({args.samples} writes, alternating with the other pair; B's API polled)")
            assert link_via(relay_pair[1], relay_pair[0]) == "relay"
        finally:
            direct_cluster.close()
            relay_cluster.close()
            relay.stop()
    ratio = relay_rate / direct_rate
    table.add("relay / direct initial sync", f"{ratio:.0%}", "(goal >= 50%)" + ("" if ratio >= 0.5 else "  MISSED"))
    extra = statistics.median(relay_live) - statistics.median(direct_live)
    table.add("relay - direct live p50", f"{extra * 1000:+.1f} ms", "(goal <= +2 ms)" + ("" if extra <= 0.002 else "  MISSED"))
    table.print()


if __name__ == "__main__":
    main()
