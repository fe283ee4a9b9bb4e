"""Replication between real stores over real pinned-TLS peer links on 127.0.0.1.

Two nodes each run a `PeerReplication` on their end of one connection; each pushes its shares
to the other. Waiting is event-driven (the replicators' events, bounded by `trio.fail_after`).
A peer that misbehaves is played by the test itself over a real connection.
"""

import inspect
import itertools
from contextlib import asynccontextmanager

import attrs
import msgpack
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from plugshare.replication.frames import FrameDecoder, encode
from plugshare.replication.link import LinkConfig, LocalNode
from plugshare.replication.protocol import (
    ACK,
    DIFF,
    DOCS,
    MISSING,
    OPEN,
    OPENED,
    PROTOCOL_VERSION,
    BatchAcked,
    BatchReceived,
    BatchSent,
    CaughtUp,
    CheckpointSaved,
    DocRefused,
    DocWithheld,
    StreamEnded,
    StreamStarted,
)
from plugshare.replication.replicator import (
    Echoes,
    PeerReplication,
    ReplicationConfig,
    changes_after,
    checkpoint_id,
    load_checkpoint,
    page_limit,
    seq_number,
    store_instance_id,
)
from plugshare.replication.transport import PeerConnectionClosed, TransportConfig, connect_peer, serve_peers
from plugshare.store.base import NotFound
from plugshare.store.revtree import compute_rev, history_of
from plugshare.store.sqlite import SQLiteStore
from plugshare.token.tls import client_auth_payload, client_ssl_context, make_tls_credentials, server_ssl_context
from tests.store.conftest import unique_db_name

TRANSPORT = TransportConfig(link=LinkConfig(handshake_timeout=5.0, ping_interval=1.0, dead_after=10.0), close_timeout=1.0)
SMALL_BATCHES = ReplicationConfig(batch_size=50, max_in_flight=4)
TIMEOUT = 60  # generous: a loaded CI machine; waits end on events, never on the clock
_names = itertools.count()


class Node:
    """`key` is the identity key a token would hold; `prove` and the delegation stand in for it."""

    def __init__(self, name: str) -> None:
        self.key = Ed25519PrivateKey.generate()
        public_key = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.local = LocalNode(public_key=public_key, name=name, addresses=("127.0.0.1:0",))
        self.id = self.local.node_id
        self.tls_key, self.delegation = make_tls_credentials(public_key, self.key.sign)

    async def prove(self, server_id: bytes, nonce: bytes) -> bytes:
        return self.key.sign(client_auth_payload(server_id, nonce, self.id))


class EventLog:
    """Collects a replicator's events; `changed` is set (and replaced) on each new one."""

    def __init__(self) -> None:
        self.events = []
        self.changed = trio.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        self.changed.set()
        self.changed = trio.Event()

    def of(self, kind, **fields):
        return [e for e in self.events if isinstance(e, kind) and all(getattr(e, k) == v for k, v in fields.items())]


async def until(check, *logs):
    """The first truthy result of `check()` (awaited if async), re-checked after every event
    of the given logs."""
    with trio.fail_after(TIMEOUT):
        while True:
            seen = [log.changed for log in logs]  # taken before checking: nothing slips between
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            async with trio.open_nursery() as nursery:
                for changed in seen:
                    async def wait(changed=changed):
                        await changed.wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(wait)


def everything(doc):
    return True


def accept_all(peer, doc):
    return True, ""


@attrs.define(eq=False)
class Side:
    """One node in a test: its store, identity, what it pushes and what it accepts."""

    name: str
    store: object
    node: Node = attrs.field(init=False)
    events: EventLog = attrs.Factory(EventLog)
    pushes: dict = attrs.Factory(dict)  # share -> in_scope
    accept: object = accept_all
    accepted_shares: frozenset = frozenset({"notes"})
    config: ReplicationConfig = SMALL_BATCHES
    store_id: str = ""
    connection: object = None

    def __attrs_post_init__(self) -> None:
        self.node = Node(self.name)

    def accept_share(self, share):
        return self.accept if share in self.accepted_shares else None

    async def replicate(self, connection, peer_id: bytes) -> None:
        """Run replication on `connection` until it closes."""
        self.connection = connection
        self.store_id = self.store_id or await store_instance_id(self.store)
        replication = PeerReplication(
            connection, self.store, peer=peer_id.hex(), store_id=self.store_id,
            accept_share=self.accept_share, on_event=self.events, config=self.config,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(replication.run)
            for share, in_scope in self.pushes.items():
                replication.start_push(share, in_scope=in_scope)


async def start_listener(nursery, node, handler, transport=TRANSPORT):
    scope = trio.CancelScope()

    async def run(task_status):
        with scope:
            await serve_peers(
                handler, host="127.0.0.1", port=0, ssl_context=server_ssl_context(node.tls_key, node.delegation),
                local=node.local, accept_peer=lambda fingerprint: True, config=transport, task_status=task_status,
            )

    listeners = await nursery.start(run)
    return listeners[0].socket.getsockname()[1], scope


def dial(port, server: Node, client: Node, transport=TRANSPORT):
    return connect_peer("127.0.0.1", port, expected_fingerprint=server.id, ssl_context=client_ssl_context(),
                        local=client.local, prove=client.prove, config=transport)


@asynccontextmanager
async def linked(a: Side, b: Side, transport=TRANSPORT):
    """`a` dials `b`; both replicate over the link for the duration of the block."""
    async with trio.open_nursery() as nursery:
        handler = lambda connection: b.replicate(connection, a.node.id)  # noqa: E731
        port, listener = await start_listener(nursery, b.node, handler, transport)
        async with dial(port, b.node, a.node, transport) as connection:
            nursery.start_soon(a.replicate, connection, b.node.id)
            yield connection
        listener.cancel()


async def open_store(backend, request, tmp_path):
    if backend == "sqlite":
        return await SQLiteStore.open(tmp_path / f"store-{next(_names)}.sqlite")
    from plugshare.store.couchdb import CouchDBStore

    # unique per run: a server of one's own (PLUGSHARE_TEST_COUCHDB_URL) keeps past runs' dbs
    return await CouchDBStore.open(request.getfixturevalue("couchdb_url"),
                                   unique_db_name("replication"))


@pytest.fixture
async def stores(request, tmp_path):
    """Two fresh stores: sqlite and sqlite, or (with param "couchdb") sqlite and couchdb."""
    second = getattr(request, "param", "sqlite")
    a = await open_store("sqlite", request, tmp_path)
    b = await open_store(second, request, tmp_path)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


both_backends = pytest.mark.parametrize("stores", ["sqlite", "couchdb"], indirect=True)


async def put_many(store, docs):
    results = await store.bulk_docs(docs)
    assert all(result.get("ok") for result in results), results
    return {result["id"]: result["rev"] for result in results}


async def leaves(store):
    """Every doc as {id: (winner, {all leaves}, deleted)}: the revision trees' tips."""
    page = await store.changes(0)
    return {change.id: (change.revs[0], frozenset(change.revs), change.deleted) for change in page.results}


async def wait_caught_up(side, since=0):
    """Until `side`'s push reported being caught up (after its `since`-th event)."""

    await until(lambda: any(isinstance(e, CaughtUp) and e.direction == "push" for e in side.events.events[since:]),
                side.events)


async def wait_for_doc(side, doc_id, rev=None):
    """`side`'s copy of `doc_id` (at `rev`, when given), once replication has brought it."""

    async def arrived():
        try:
            return await side.store.get(doc_id, rev=rev)
        except NotFound:
            return None

    return await until(arrived, side.events)


async def converge(a, b, check=None):
    """Until both stores hold the same revisions (and `check(leaves)` holds, when given).

    This waits on the stores, not on `CaughtUp`: pouchdb-server can answer `_changes` with an
    empty page while it writes a replicated conflict, so its side may report being caught up
    one read too early (it then reads again at once and sends the rest)."""

    async def same():
        leaves_a, leaves_b = await leaves(a.store), await leaves(b.store)
        return leaves_a == leaves_b and (check is None or check(leaves_a)) and leaves_a

    return await until(same, a.events, b.events)


# --- syncing -----------------------------------------------------------------------------------


@both_backends
async def test_initial_sync_both_ways_then_live_edits(stores):
    store_a, store_b = stores
    a = Side("a", store_a, pushes={"notes": everything})
    b = Side("b", store_b, pushes={"notes": everything})
    revs_a = await put_many(store_a, [{"_id": f"a{n:03}", "doctype": "note", "n": n} for n in range(300)])
    revs_b = await put_many(store_b, [{"_id": f"b{n:03}", "doctype": "note", "n": n} for n in range(200)])
    async with linked(a, b):
        await converge(a, b, lambda leaves: len(leaves) == 500)
        await wait_caught_up(a)
        await wait_caught_up(b)
        assert (await store_b.get("a123"))["n"] == 123 and (await store_a.get("b199"))["_rev"] == revs_b["b199"]

        # Live: an edit on either side shows up on the other.
        rev = await store_a.put({"_id": "a007", "_rev": revs_a["a007"], "doctype": "note", "n": "edited"})
        assert (await wait_for_doc(b, "a007", rev))["n"] == "edited"
        rev = await store_b.put({"_id": "fresh", "doctype": "note"})
        await wait_for_doc(a, "fresh", rev)
    started = a.events.of(StreamStarted, direction="push")
    assert [event.since for event in started] == [0]


@both_backends
async def test_concurrent_edits_end_as_the_same_conflict_on_both_sides(stores):
    store_a, store_b = stores
    a = Side("a", store_a, pushes={"notes": everything})
    b = Side("b", store_b, pushes={"notes": everything})
    base = await store_a.put({"_id": "shared", "doctype": "note", "v": 0})
    async with linked(a, b):
        await wait_for_doc(b, "shared", base)
    # Apart, each side edits the same revision.
    left = await store_a.put({"_id": "shared", "_rev": base, "doctype": "note", "v": "a"})
    right = await store_b.put({"_id": "shared", "_rev": base, "doctype": "note", "v": "b"})
    async with linked(a, b):
        tips = await converge(a, b, lambda leaves: len(leaves["shared"][1]) == 2)
    assert tips["shared"][1] == {left, right}
    doc_a = await store_a.get("shared", conflicts=True)
    assert doc_a == await store_b.get("shared", conflicts=True)
    assert {doc_a["_rev"], *doc_a["_conflicts"]} == {left, right}
    assert doc_a["_rev"] == max([left, right], key=lambda rev: (int(rev.split("-")[0]), rev.split("-")[1]))


@both_backends
async def test_deletions_replicate(stores):
    store_a, store_b = stores
    a = Side("a", store_a, pushes={"notes": everything})
    b = Side("b", store_b)
    revs = await put_many(store_a, [{"_id": f"d{n}", "doctype": "note"} for n in range(5)])
    async with linked(a, b):
        await wait_caught_up(a)
        tombstone = await store_a.delete("d2", revs["d2"])
        assert (await wait_for_doc(b, "d2", tombstone)) == {"_id": "d2", "_rev": tombstone, "_deleted": True}
    with pytest.raises(NotFound):
        await store_b.get("d2")
    assert (await leaves(store_b))["d2"] == (tombstone, frozenset({tombstone}), True)
    assert [doc["_id"] for doc in await store_b.all_docs()] == ["d0", "d1", "d3", "d4"]


async def test_a_doc_outside_the_share_never_crosses(stores):
    store_a, store_b = stores

    def notes_only(doc):
        return doc.get("doctype") == "note"

    a = Side("a", store_a, pushes={"notes": notes_only})
    b = Side("b", store_b)
    await put_many(store_a, [{"_id": "secret-1", "doctype": "diary"}, {"_id": "note-1", "doctype": "note"}])
    async with linked(a, b):
        await wait_caught_up(a)
        await store_a.put({"_id": "secret-2", "doctype": "diary"})
        rev = await store_a.put({"_id": "note-2", "doctype": "note"})  # after secret-2 in the feed
        await wait_for_doc(b, "note-2", rev)
        # An edit that takes a shared doc out of the share does not leak either.
        note = await store_a.get("note-1")
        await store_a.put({"_id": "note-1", "_rev": note["_rev"], "doctype": "diary"})
        rev = await store_a.put({"_id": "note-3", "doctype": "note"})
        await wait_for_doc(b, "note-3", rev)
    assert [doc["_id"] for doc in await store_b.all_docs()] == ["note-1", "note-2", "note-3"]
    assert (await leaves(store_b))["note-1"][1] == frozenset({note["_rev"]})
    missing = await store_b.revs_diff({"secret-1": [(await store_a.get("secret-1"))["_rev"]]})
    assert "secret-1" in missing


async def test_a_doc_the_target_refuses_is_not_written_and_the_rest_is(stores):
    store_a, store_b = stores

    def no_forbidden(peer, doc):
        return (not doc.get("forbidden"), "forbidden docs are not accepted from this member")

    a = Side("a", store_a, pushes={"notes": everything})
    b = Side("b", store_b, accept=no_forbidden)
    await put_many(store_a, [{"_id": f"n{n}", "doctype": "note", "forbidden": n in (3, 7)} for n in range(10)])
    async with linked(a, b):
        await wait_caught_up(a)
    assert [doc["_id"] for doc in await store_b.all_docs()] == [f"n{n}" for n in range(10) if n not in (3, 7)]
    refused_here = b.events.of(DocRefused, direction="pull")
    assert sorted(event.doc_id for event in refused_here) == ["n3", "n7"]
    assert all(event.reason == "refused: forbidden docs are not accepted from this member" for event in refused_here)
    refused_there = a.events.of(DocRefused, direction="push")
    assert sorted(event.doc_id for event in refused_there) == ["n3", "n7"]
    # The refusal does not hold the checkpoint back: it covers the whole feed.
    checkpoint = await load_checkpoint(store_a, "notes", b.node.id.hex())
    assert checkpoint.seq == (await store_a.changes(0)).last_seq


async def test_a_share_the_peer_does_not_accept_ends_that_push_only(stores):
    store_a, store_b = stores
    a = Side("a", store_a, pushes={"notes": everything, "photos": everything})
    b = Side("b", store_b)
    rev = await store_a.put({"_id": "n", "doctype": "note"})
    async with linked(a, b):
        await until(lambda: a.events.of(StreamEnded, share="photos"), a.events)
        await wait_for_doc(b, "n", rev)
    [ended] = a.events.of(StreamEnded, share="photos")
    assert ended.reason == "the peer ended it: this node does not accept share 'photos' from you"
    assert not ended.passing and ended.retry_in is None  # a refusal is not retried
    assert b.events.of(StreamEnded, share="photos", direction="pull")


async def test_big_docs_both_ways_through_tiny_transport_buffers_converge(stores):
    """Both nodes push big docs at once over TLS while the link's buffers hold almost nothing
    (the kernel's socket buffers still do: the unbuffered pipe below is the strict test)."""
    store_a, store_b = stores
    tight = TransportConfig(link=TRANSPORT.link, send_buffer_size=8 * 1024, receive_queue_size=1, close_timeout=1.0)
    config = ReplicationConfig(batch_size=10, batch_bytes=32 * 1024, max_in_flight=4, window=4,
                               docs_message_bytes=16 * 1024, inbox_size=1)
    a = Side("a", store_a, pushes={"notes": everything}, config=config)
    b = Side("b", store_b, pushes={"notes": everything}, config=config)
    blob = "z" * 8000
    await put_many(store_a, [{"_id": f"a{n:03}", "doctype": "note", "blob": blob} for n in range(150)])
    await put_many(store_b, [{"_id": f"b{n:03}", "doctype": "note", "blob": blob} for n in range(150)])
    async with linked(a, b, tight):
        await converge(a, b, lambda leaves: len(leaves) == 300)
    assert len(await store_a.all_docs()) == len(await store_b.all_docs()) == 300
    # The first batch reads `batch_size` changes; once doc sizes are known, about 32 KB each.
    # (in batch order: a small batch's docs go with its offer, so it may be sent before an
    # earlier, diff-first batch's rep.missing comes back)
    offered = [event.offered for event in sorted(a.events.of(BatchSent), key=lambda e: e.batch)
               if event.offered]
    assert offered[0] == 10 and set(offered[1:]) == {4}  # 32 KB // ~8.1 KB


def test_big_docs_make_smaller_batches():
    config = ReplicationConfig(batch_size=200, batch_bytes=1000)
    assert page_limit(config, None) == 200
    assert page_limit(config, 1.5) == 200
    assert page_limit(config, 100.0) == 10
    assert page_limit(config, 5000.0) == 1


@both_backends
async def test_each_batch_tells_the_target_how_much_is_still_coming_and_its_size(stores):
    store_a, store_b = stores
    a = Side("a", store_a)
    b = Side("b", store_b, pushes={"notes": everything})  # b's store may be CouchDB: it sends
    revs = await put_many(store_b, [{"_id": f"n{n:03}", "doctype": "note", "n": n} for n in range(230)])

    def received():
        return sorted(a.events.of(BatchReceived), key=lambda event: event.batch)

    async with linked(a, b):
        await until(lambda: sum(event.written for event in received()) == 230, a.events)
        await until(lambda: a.events.of(CaughtUp, direction="pull"), a.events)
        sent = await store_b.bulk_get(list(revs.items()))
    batches = received()
    # Batches of 50 from a feed of fresh inserts: the estimate is exact, down to 0 at the end.
    assert len(batches) == 5
    assert [event.pending for event in batches] == [230 - done for done in
                                                   itertools.accumulate(e.written for e in batches)]
    assert batches[-1].pending == 0
    assert all(event.bytes > 0 for event in batches)
    # What arrived is the size of what the source read and sent, both ends agreeing.
    assert sum(event.bytes for event in batches) == sum(
        len(msgpack.packb(doc, use_bin_type=True)) for doc in sent)
    assert [event.bytes for event in b.events.of(BatchAcked)] == [event.bytes for event in batches]


def test_pending_counts_the_updates_between_two_seqs_whatever_their_form():
    assert changes_after(230, 50) == 180 and changes_after(50, 50) == 0
    assert changes_after(40, 50) == 0  # an update_seq read before the page: never negative
    assert changes_after("230", "50") == 180  # integer seqs passed as text
    assert changes_after("230-g1AAAAJTeJzLYWBgYMpgTmEQTM4vTc5ISXIwNDLXMzQwMtIzMjY1Mdc", "50-g1AAAAJTeJzL") == 180
    assert changes_after(2**70, 0) == 2**63 - 1  # kept within what the message may carry
    for unknown in (None, "", "abc", "-5", -5, True, 1.5, "12x"):
        assert changes_after(unknown, 10) is None and changes_after(10, unknown) is None
    assert seq_number("12-abc") == 12 and seq_number(0) == 0 and seq_number("٣") is None


class PipeEnd:
    """One end of an in-memory message pipe with no buffering at all: `send` waits until the
    other end takes the message. It behaves like a peer connection whose buffers are full."""

    def __init__(self, outgoing, incoming):
        self._outgoing, self._incoming = outgoing, incoming

    async def send(self, message):
        try:
            await self._outgoing.send(decode(encode(message)))  # a copy, as off the wire
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise PeerConnectionClosed("the pipe is closed") from None

    async def receive(self):
        try:
            return await self._incoming.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise PeerConnectionClosed("the pipe is closed") from None


def decode(frame):
    decoder = FrameDecoder()
    decoder.feed(frame)
    [message] = list(decoder)
    return message


async def test_pushing_both_ways_at_once_through_an_unbuffered_pipe_does_not_deadlock(stores):
    """Both nodes push at once and neither direction buffers a single message, so each side's
    receive loop must keep taking messages while its own sends wait (see the replicator's notes
    on deadlock freedom)."""
    store_a, store_b = stores
    config = ReplicationConfig(batch_size=5, max_in_flight=4, window=4, docs_message_bytes=4096, inbox_size=1)
    a_to_b, b_from_a = trio.open_memory_channel(0)
    b_to_a, a_from_b = trio.open_memory_channel(0)
    a = Side("a", store_a, pushes={"notes": everything}, config=config)
    b = Side("b", store_b, pushes={"notes": everything}, config=config)
    blob = "p" * 2000
    await put_many(store_a, [{"_id": f"a{n:03}", "doctype": "note", "blob": blob} for n in range(100)])
    await put_many(store_b, [{"_id": f"b{n:03}", "doctype": "note", "blob": blob} for n in range(100)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.replicate, PipeEnd(a_to_b, a_from_b), b.node.id)
        nursery.start_soon(b.replicate, PipeEnd(b_to_a, b_from_a), a.node.id)
        await converge(a, b, lambda leaves: len(leaves) == 200)
        nursery.cancel_scope.cancel()
    assert len(await store_a.all_docs()) == len(await store_b.all_docs()) == 200


async def test_a_peer_that_stops_reading_cannot_wedge_the_replicator_once_the_link_closes(stores):
    """The peer floods requests and reads no reply, so every queue on our side fills up and our
    receive loop waits; closing the link must still end `run` and report the stream."""
    _, store_b = stores
    config = ReplicationConfig(window=1, inbox_size=1)
    b = Side("b", store_b, config=config)
    to_b, b_incoming = trio.open_memory_channel(0)
    b_outgoing, from_b = trio.open_memory_channel(0)
    flooded = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.replicate, PipeEnd(b_outgoing, b_incoming), b"\x01" * 32)
        await to_b.send(message(OPEN, v=PROTOCOL_VERSION))

        async def flood():
            for number in itertools.count():
                with trio.move_on_after(0.5) as stuck:  # until b stops taking requests
                    await to_b.send(message(DIFF, batch=number, revs={}))
                if stuck.cancelled_caught:
                    flooded.set()
                    return

        nursery.start_soon(flood)
        with trio.fail_after(TIMEOUT):
            await flooded.wait()
            await from_b.aclose()  # the link goes down: b's sends fail...
            await to_b.aclose()  # ...and its receive loop, once free, sees the end
            await until(lambda: b.events.of(StreamEnded), b.events)
    [ended] = b.events.of(StreamEnded)
    assert (ended.direction, ended.reason) == ("pull", "the connection closed: the pipe is closed")


async def test_stopping_a_push_tells_the_peer_and_other_messages_reach_their_handler(stores):
    store_a, store_b = stores
    a = Side("a", store_a, pushes={"notes": everything})
    other = []
    got_other = trio.Event()

    async def other_message(message):
        other.append(message)
        got_other.set()

    b_events = EventLog()
    async with trio.open_nursery() as nursery:
        async def serve(connection):
            replication = PeerReplication(connection, store_b, peer=a.node.id.hex(), store_id="b-store",
                                          accept_share=lambda share: accept_all, on_event=b_events,
                                          other_message=other_message)
            await replication.run()

        b_node = Node("b")
        port, listener = await start_listener(nursery, b_node, serve)
        async with dial(port, b_node, a.node) as connection:
            replication = PeerReplication(connection, store_a, peer=b_node.id.hex(), store_id="a-store",
                                          accept_share=lambda share: None, on_event=a.events)
            await nursery.start(replication.run)
            replication.start_push("notes", in_scope=everything)
            await wait_caught_up(a)
            assert replication.pushing == {"notes"}
            replication.stop_push("notes", "share revoked")
            await until(lambda: b_events.of(StreamEnded), b_events)
            assert replication.pushing == frozenset()
            await connection.send({"type": "manifest", "version": 3})
            with trio.fail_after(TIMEOUT):
                await got_other.wait()
        listener.cancel()
    [ended] = a.events.of(StreamEnded)
    assert (ended.direction, ended.reason) == ("push", "share revoked")
    [ended] = b_events.of(StreamEnded)
    assert (ended.direction, ended.reason) == ("pull", "the peer ended it: share revoked")
    assert other == [{"type": "manifest", "version": 3}]


# --- interruptions -----------------------------------------------------------------------------


class CutAfterWrites:
    """A store that closes the peer connection right after its `cut_at`-th replicated write
    is durable, before the target can acknowledge it."""

    def __init__(self, store, side, cut_at):
        self._store, self._side, self._cut_at = store, side, cut_at
        self.writes = 0

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def bulk_docs(self, docs, *, new_edits=True):
        results = await self._store.bulk_docs(docs, new_edits=new_edits)
        if not new_edits:
            self.writes += 1
            if self.writes == self._cut_at:
                await self._side.connection.aclose("cut by the test")
        return results


class CheckedCheckpoints:
    """A source store that, before every checkpoint write, checks that every change up to the
    checkpoint is already durable in the target store."""

    def __init__(self, store, target):
        self._store, self._target = store, target
        self.checked = []

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def put_local(self, local_id, doc):
        if local_id.startswith("plugshare-push-"):
            covered = [change for change in (await self._store.changes(0)).results if change.seq <= doc["seq"]]
            lacking = await self._target.revs_diff({change.id: list(change.revs) for change in covered})
            assert lacking == {}, f"checkpoint {doc['seq']} ran ahead of the target: it lacks {sorted(lacking)}"
            self.checked.append(doc["seq"])
        await self._store.put_local(local_id, doc)


async def test_a_connection_cut_between_write_and_ack_resumes_from_a_safe_checkpoint(stores):
    store_a, store_b = stores
    source = CheckedCheckpoints(store_a, store_b)
    a = Side("a", source, pushes={"notes": everything})
    b = Side("b", store_b)
    b.store = CutAfterWrites(store_b, b, cut_at=3)
    await put_many(store_a, [{"_id": f"c{n:03}", "doctype": "note", "n": n} for n in range(400)])

    async with linked(a, b):
        await until(lambda: a.events.of(StreamEnded, direction="push"), a.events)
    [ended] = a.events.of(StreamEnded, direction="push")
    assert "cut by the test" in ended.reason
    saved = [event.seq for event in a.events.of(CheckpointSaved)]
    assert b.store.writes >= 3  # three batches were durable at the target...
    assert len(saved) < 3  # ...but at most the first two were acknowledged before the cut
    assert len(await store_b.all_docs()) < 400

    mark = len(a.events.events)
    async with linked(a, b):
        await wait_caught_up(a, since=mark)
    [restarted] = a.events.of(StreamStarted, direction="push")[1:]
    assert restarted.since == (saved[-1] if saved else 0)  # resumed where it had been acknowledged
    assert await leaves(store_b) == await leaves(store_a)
    assert source.checked and source.checked[-1] == (await store_a.changes(0)).last_seq


async def test_a_replaced_target_store_is_sent_everything_again(stores, tmp_path):
    store_a, store_b = stores
    a = Side("a", store_a, pushes={"notes": everything})
    b = Side("b", store_b)
    await put_many(store_a, [{"_id": f"r{n}", "doctype": "note"} for n in range(20)])
    async with linked(a, b):
        await wait_caught_up(a)
    # The peer comes back with the same identity but a new, empty store.
    fresh = await SQLiteStore.open(tmp_path / "replaced.sqlite")
    try:
        b.store, b.store_id = fresh, ""
        mark = len(a.events.events)
        async with linked(a, b):
            await wait_caught_up(a, since=mark)
        assert a.events.of(StreamStarted, direction="push")[-1].since == 0
        assert len(await fresh.all_docs()) == 20
    finally:
        await fresh.aclose()


# --- peers that misbehave, played by the test ----------------------------------------------------


def message(message_type, **fields):
    return {"type": message_type, "share": "notes", "stream": "evil", **fields}


def revision(doc_id, body, parents=()):
    rev = compute_rev(parents[0] if parents else None, False, body)
    return {"_id": doc_id, "_rev": rev, "_revisions": history_of((rev, *parents)), **body}


async def test_forged_histories_and_docs_not_asked_for_are_refused_and_batches_may_repeat(stores):
    _, store_b = stores
    b = Side("b", store_b)
    evil = Node("evil")
    good = revision("good", {"doctype": "note"})
    parent = revision("child", {"doctype": "note", "v": 0})
    child = revision("child", {"doctype": "note", "v": 1}, parents=(parent["_rev"],))
    forged = {**child, "_revisions": {"start": 2, "ids": ["f" * 32, parent["_rev"][2:]]}}  # _rev is not ids[0]
    unasked = revision("unasked", {"doctype": "note"})
    async with trio.open_nursery() as nursery:
        port, listener = await start_listener(nursery, b.node, lambda connection: b.replicate(connection, evil.id))
        async with dial(port, b.node, evil) as connection:
            with trio.fail_after(TIMEOUT):
                await connection.send(message(OPEN, v=PROTOCOL_VERSION))
                opened = await connection.receive()
                assert opened["type"] == OPENED and opened["store"] == await store_instance_id(store_b)
                diff = message(DIFF, batch=0, revs={"good": [good["_rev"]], "child": [child["_rev"]]})
                await connection.send(diff)
                missing = await connection.receive()
                assert missing == message(MISSING, batch=0, missing={"good": [good["_rev"]], "child": [child["_rev"]]})
                await connection.send(message(DOCS, batch=0, docs=[forged, unasked, good], last=True))
                ack = await connection.receive()
                assert ack["type"] == ACK and ack["written"] == 1
                reasons = {entry[0]: entry[2] for entry in ack["refused"]}
                assert set(reasons) == {"child", "unasked"}
                assert reasons["child"].startswith("forged or malformed history:")
                assert reasons["unasked"] == "not asked for in batch 0 (or sent twice)"

                # The same batch again, under its number and another: nothing missing, nothing new.
                update_seq = (await store_b.info())["update_seq"]
                for number in (0, 1):
                    await connection.send({**diff, "batch": number, "revs": {"good": [good["_rev"]]}})
                    assert (await connection.receive())["missing"] == {}
                    await connection.send(message(DOCS, batch=number, docs=[good, unasked], last=True))
                assert (await store_b.info())["update_seq"] == update_seq

                # A message that breaks the protocol ends the stream, with the reason.
                await connection.send(message(DIFF, batch=2, revs={"good": ["not-a-rev"]}))
                refusal = await connection.receive()
                assert refusal["type"] == "rep.refuse" and "invalid revision" in refusal["reason"]
        listener.cancel()
    assert await store_b.get("good") == {k: v for k, v in good.items() if k != "_revisions"}
    for doc_id in ("child", "unasked"):
        with pytest.raises(NotFound):
            await store_b.get(doc_id)
    refused = b.events.of(DocRefused, direction="pull")
    assert [(event.doc_id, event.reason) for event in refused[2:]] == [
        ("good", "not asked for: batch 0 is not open"), ("unasked", "not asked for: batch 0 is not open"),
        ("good", "not asked for: batch 1 is not open"), ("unasked", "not asked for: batch 1 is not open"),
    ]
    assert len(b.events.of(BatchReceived)) == 1
    [ended] = b.events.of(StreamEnded, direction="pull")
    assert ended.reason.startswith("protocol error:") and "invalid revision" in ended.reason


async def test_a_target_asking_for_revisions_not_offered_gets_only_the_offered_ones(stores):
    store_a, _ = stores

    def notes_only(doc):
        return doc.get("doctype") == "note"

    a = Side("a", store_a, pushes={"notes": notes_only})
    evil = Node("evil")
    revs = await put_many(store_a, [{"_id": "note", "doctype": "note"}, {"_id": "secret", "doctype": "diary"}])
    received = []

    async def greedy_target(connection):
        opened = await connection.receive()
        assert opened["type"] == OPEN
        stream = {"share": "notes", "stream": opened["stream"]}
        await connection.send({"type": OPENED, **stream, "store": "evil-store", "window": 4})
        diff = await connection.receive()
        assert diff["type"] == DIFF and diff["revs"] == {"note": [revs["note"]]}
        greedy = {"note": [revs["note"]], "secret": [revs["secret"]], "other": ["1-" + "0" * 32]}
        await connection.send({"type": MISSING, **stream, "batch": diff["batch"], "missing": greedy})
        docs = await connection.receive()
        received.append(docs)
        await connection.send({"type": ACK, **stream, "batch": diff["batch"], "written": 1, "refused": []})
        assert (await connection.receive())["type"] == "rep.caught_up"
        await connection.aclose("done")

    async with trio.open_nursery() as nursery:
        port, listener = await start_listener(nursery, evil, greedy_target)
        async with dial(port, evil, a.node) as connection:
            await a.replicate(connection, evil.id)
        listener.cancel()
    [docs] = received
    assert [doc["_id"] for doc in docs["docs"]] == ["note"] and docs["last"] is True
    withheld = a.events.of(DocWithheld)
    assert sorted(event.doc_id for event in withheld) == ["other", "secret"]
    assert all("did not offer" in event.reason for event in withheld)
    checkpoint = await store_a.get_local(checkpoint_id("notes", evil.id.hex()))
    assert checkpoint["seq"] == (await store_a.changes(0)).last_seq and checkpoint["target_store"] == "evil-store"


async def test_a_target_breaking_the_protocol_ends_the_push_and_is_told_why(stores):
    store_a, _ = stores
    a = Side("a", store_a, pushes={"notes": everything})
    evil = Node("evil")
    await put_many(store_a, [{"_id": "n", "doctype": "note"}])
    told = []

    async def lying_target(connection):
        opened = await connection.receive()
        stream = {"share": "notes", "stream": opened["stream"]}
        await connection.send({"type": OPENED, **stream, "store": "evil-store", "window": 4})
        await connection.receive()  # the diff of batch 0
        await connection.send({"type": ACK, **stream, "batch": 99, "written": 0, "refused": []})
        told.append(await connection.receive())

    async with trio.open_nursery() as nursery:
        port, listener = await start_listener(nursery, evil, lying_target)
        async with dial(port, evil, a.node) as connection:
            await a.replicate(connection, evil.id)
        listener.cancel()
    [ended] = a.events.of(StreamEnded, direction="push")
    assert ended.reason == "protocol error: rep.ack for batch 99, which is unknown"
    assert told == [{"type": "rep.end", "share": "notes", "stream": "1", "reason": ended.reason}]
    with pytest.raises(NotFound):
        await store_a.get_local(checkpoint_id("notes", evil.id.hex()))


async def _a_change_then_a_marker(a, b) -> None:
    """`from-a` written on a and received by b, then `marker` written on b and received by a."""
    rev = await a.store.put({"_id": "from-a", "doctype": "note"})
    await wait_for_doc(b, "from-a", rev)
    marker = await b.store.put({"_id": "marker", "doctype": "note"})
    await wait_for_doc(a, "marker", marker)


@both_backends
async def test_a_change_received_is_not_offered_back_to_the_peer_that_sent_it(stores):
    """b's feed sees what a sent it; b's push to a skips it (a holds it): no store read, gate
    decision or round trip for it. A marker written on b after it shows, by feed order, that
    it would have been offered by then."""
    store_a, store_b = stores
    a = Side("a", store_a, pushes={"notes": everything})
    b = Side("b", store_b, pushes={"notes": everything})
    async with linked(a, b):
        await _a_change_then_a_marker(a, b)
    assert sum(event.offered for event in b.events.of(BatchSent)) == 1  # the marker alone
    assert sum(event.offered for event in a.events.of(BatchSent)) == 1  # from-a alone


def test_echoes_are_bounded_oldest_forgotten_first():
    echoes = Echoes(limit=3)
    echoes.add([("a", "1-x"), ("b", "1-x"), ("c", "1-x")])
    echoes.add([("a", "1-x"), ("d", "1-x")])  # a again: now the most recent
    assert len(echoes) == 3
    assert ("b", "1-x") not in echoes
    assert all(pair in echoes for pair in [("a", "1-x"), ("c", "1-x"), ("d", "1-x")])


async def test_a_page_of_echoes_alone_moves_the_checkpoint_without_a_durable_write(stores):
    """b's feed holds what a sent it: b's push passes it in memory and saves its checkpoint
    with its next real batch (the marker's), not once per change received."""
    store_a, store_b = stores
    a = Side("a", store_a, pushes={"notes": everything})
    b = Side("b", store_b, pushes={"notes": everything})
    async with linked(a, b):
        await _a_change_then_a_marker(a, b)
        newest = (await store_b.info())["update_seq"]
        saved = await until(lambda: [event.seq for event in b.events.of(CheckpointSaved)
                                     if event.seq == newest], b.events)
    assert saved == [newest]
    assert len(b.events.of(CheckpointSaved)) == 1  # none for the page holding from-a alone
    checkpoint = await load_checkpoint(store_b, "notes", a.node.id.hex())
    assert checkpoint is not None and checkpoint.seq == newest


async def test_a_live_change_costs_each_side_one_read_of_its_feed(stores):
    """Profiled on the live path: each side read its changes feed twice per live change,
    the second read only to find it empty (0.75 ms each, in the store's one worker). A
    page shorter than asked already says the feed is drained: the push then waits for the
    next change at once."""
    store_a, store_b = stores
    a = Side("a", store_a, pushes={"notes": everything})
    b = Side("b", store_b, pushes={"notes": everything})
    reads = {"a": 0, "b": 0}
    for name, store in (("a", store_a), ("b", store_b)):
        changes = store.changes

        async def counting(*args, changes=changes, name=name, **kwargs):
            reads[name] += 1
            return await changes(*args, **kwargs)

        store.changes = counting
    async with linked(a, b):
        first = await store_a.put({"_id": "warm", "doctype": "note"})
        await wait_for_doc(b, "warm", first)
        await trio.sleep(0.2)  # both feeds settled after the first exchange
        before = dict(reads)
        for n in range(10):
            rev = await store_a.put({"_id": f"live{n}", "doctype": "note"})
            await wait_for_doc(b, f"live{n}", rev)
        await trio.sleep(0.2)
        assert reads["a"] - before["a"] <= 10, reads  # one read per change it sent
        assert reads["b"] - before["b"] <= 10, reads  # one per change it wrote (an echo)


async def test_a_catch_up_never_counts_the_store(stores):
    """A push whose feed caught up asked the store's `info()` for its update_seq, and the
    embedded store's info counts every live doc: on the receiving side of an initial sync
    (its own push following the feed the pull writes) that was a full scan per page, in the
    store's one worker: a 100k-doc sync ran 60% slower per doc than a 10k one. The seq alone
    is asked now (`update_seq()`), which costs nothing."""
    store_a, store_b = stores
    for n in range(300):
        await store_a.put({"_id": f"n{n:03}", "doctype": "note"})
    counted = []
    for store in stores:
        info = store.info

        async def counting(info=info):
            counted.append(1)
            return await info()

        store.info = counting
    a = Side("a", store_a, pushes={"notes": everything})
    b = Side("b", store_b, pushes={"notes": everything})
    async with linked(a, b):
        await wait_for_doc(b, "n299")
        marker = await store_b.put({"_id": "marker", "doctype": "note"})
        await wait_for_doc(a, "marker", marker)
    assert counted == []


async def test_a_catch_up_saves_its_checkpoint_now_and_then_and_once_caught_up(stores):
    """Profiled on a 10k-doc initial sync: the source wrote its checkpoint durably after
    every batch (49 SQLite commits, 3.4 ms each in the store's one worker, beside the
    reads of the next batches). As CouchDB's replicator does, a catch-up now saves it
    every CHECKPOINT_INTERVAL, and always once caught up: a crash re-sends at most that
    much, which the target finds it holds."""
    store_a, store_b = stores
    await put_many(store_a, [{"_id": f"c{n:05d}", "doctype": "note"} for n in range(3000)])
    a = Side("a", store_a, pushes={"notes": everything})
    b = Side("b", store_b)
    async with linked(a, b):
        await wait_caught_up(a)
    batches = len(a.events.of(BatchAcked))
    saved = a.events.of(CheckpointSaved)
    assert batches >= 60
    assert len(saved) <= batches // 5
    checkpoint = await load_checkpoint(store_a, "notes", b.node.id.hex())
    assert checkpoint.seq == (await store_a.changes(0)).last_seq == saved[-1].seq
