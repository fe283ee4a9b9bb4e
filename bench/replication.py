"""Replication benchmark (a script, not a test): python bench/replication.py [--docs N] [--couchdb]

Two nodes on 127.0.0.1 over a real pinned-TLS peer link, each with its own store (SQLite files
in a temporary directory; with --couchdb the target is a database on a pouchdb-server started
for the run). Measures:
  - initial sync: N docs of about 1 KB pushed from A to B, docs/s from the first message to
    B holding all of them (durable: every batch is fsynced by the target before its ack);
  - live latency: a single edit on A until it is readable on B, median and worst of 50.
"""

from __future__ import annotations

import os.path
import sys

# bench/ holds a `token.py`, which would shadow the standard library's `token` module for
# anything importing it (inspect, tokenize...): take bench/ off the import path first.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import trio  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from plugshare.replication.link import LocalNode  # noqa: E402
from plugshare.replication.protocol import BatchReceived, CaughtUp  # noqa: E402
from plugshare.replication.replicator import PeerReplication, ReplicationConfig, store_instance_id  # noqa: E402
from plugshare.replication.transport import connect_peer, serve_peers  # noqa: E402
from plugshare.store.base import NotFound  # noqa: E402
from plugshare.store.sqlite import SQLiteStore  # noqa: E402
from plugshare.token.tls import (  # noqa: E402
    client_auth_payload,
    client_ssl_context,
    make_tls_credentials,
    server_ssl_context,
)


def make_node(name: str) -> tuple[Ed25519PrivateKey, LocalNode]:
    """An identity key (a token would hold it) and the node's LocalNode."""
    key = Ed25519PrivateKey.generate()
    public_key = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key, LocalNode(public_key=public_key, name=name, addresses=("127.0.0.1:0",))


def prover(key: Ed25519PrivateKey, node: LocalNode):
    """The connecting side's proof, as the token would give it."""

    async def prove(server_id: bytes, nonce: bytes) -> bytes:
        return key.sign(client_auth_payload(server_id, nonce, node.node_id))

    return prove


class Signal:
    """Wakes waiters on every replication event."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.changed = trio.Event()

    def __call__(self, event: object) -> None:
        self.events.append(event)
        self.changed.set()
        self.changed = trio.Event()


async def until_present(store, doc_id: str, rev: str, signal: Signal) -> None:
    while True:
        changed = signal.changed
        try:
            await store.get(doc_id, rev=rev)
            return
        except NotFound:
            await changed.wait()


async def run(args: argparse.Namespace, store_a, store_b) -> None:
    config = ReplicationConfig(batch_size=args.batch_size, max_in_flight=args.in_flight)
    key_a, node_a = make_node("a")
    key_b, node_b = make_node("b")
    events_a, events_b = Signal(), Signal()
    body = "x" * 900  # with the id, doctype and revision: about 1 KB per doc
    print(f"writing {args.docs} docs on A ...", flush=True)
    for start in range(0, args.docs, 1000):
        batch = range(start, min(start + 1000, args.docs))
        await store_a.bulk_docs([{"_id": f"doc-{n:07}", "doctype": "note", "n": n, "body": body} for n in batch])
    id_a, id_b = await store_instance_id(store_a), await store_instance_id(store_b)

    async def serve(connection) -> None:
        replication = PeerReplication(connection, store_b, peer=node_a.node_id.hex(), store_id=id_b,
                                      accept_share=lambda share: lambda peer, doc: (True, ""),
                                      on_event=events_b, config=config)
        await replication.run()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial_serve(serve, key_b, node_b))
        port = listeners[0].socket.getsockname()[1]
        async with connect_peer("127.0.0.1", port, expected_fingerprint=node_b.node_id,
                                ssl_context=client_ssl_context(), local=node_a,
                                prove=prover(key_a, node_a)) as connection:
            replication = PeerReplication(connection, store_a, peer=node_b.node_id.hex(), store_id=id_a,
                                          accept_share=lambda share: None, on_event=events_a, config=config)
            await nursery.start(replication.run)
            started = time.perf_counter()
            replication.start_push("notes", in_scope=lambda doc: True)
            while not any(isinstance(event, CaughtUp) for event in events_a.events):
                await events_a.changed.wait()
            elapsed = time.perf_counter() - started
            assert (await store_b.info())["doc_count"] == args.docs
            batches = sum(isinstance(event, BatchReceived) for event in events_b.events)
            print(f"initial sync: {args.docs} docs in {elapsed:.2f} s = {args.docs / elapsed:,.0f} docs/s "
                  f"({batches} batches of <= {args.batch_size}, {args.in_flight} in flight)")

            latencies = []
            for n in range(50):
                doc = await store_a.get(f"doc-{n:07}")
                begin = time.perf_counter()
                rev = await store_a.put({**doc, "n": -n})
                await until_present(store_b, doc["_id"], rev, events_b)
                latencies.append((time.perf_counter() - begin) * 1000)
            print(f"live edit A -> readable on B: median {statistics.median(latencies):.1f} ms, "
                  f"worst {max(latencies):.1f} ms (50 edits)")
        nursery.cancel_scope.cancel()


def partial_serve(handler, key, node):
    tls_key, delegation = make_tls_credentials(node.public_key, key.sign)

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        await serve_peers(handler, host="127.0.0.1", port=0, ssl_context=server_ssl_context(tls_key, delegation),
                          local=node, accept_peer=lambda fingerprint: True, task_status=task_status)

    return serve


async def main_async(args: argparse.Namespace, directory: Path, couchdb_url: str | None) -> None:
    store_a = await SQLiteStore.open(directory / "a.sqlite")
    if couchdb_url is None:
        store_b = await SQLiteStore.open(directory / "b.sqlite")
    else:
        from plugshare.store.couchdb import CouchDBStore

        store_b = await CouchDBStore.open(couchdb_url, "bench-replication")
    try:
        await run(args, store_a, store_b)
    finally:
        await store_a.aclose()
        await store_b.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=ReplicationConfig().batch_size)
    parser.add_argument("--in-flight", type=int, default=ReplicationConfig().max_in_flight)
    parser.add_argument("--couchdb", action="store_true", help="target: a pouchdb-server database")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory, contextlib.ExitStack() as stack:
        url = None
        if args.couchdb:
            from tests.support.pouchdb import running_pouchdb_server

            url = stack.enter_context(running_pouchdb_server())
        trio.run(main_async, args, Path(directory), url)


if __name__ == "__main__":
    main()
