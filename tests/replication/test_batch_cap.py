"""A write member flooding a batch, played by the test over a real pinned-TLS link to a real
replicator and store.

Seen on real nodes: 9,000 sibling revisions of one doc in one batch blocked the owner for 77 s
and left every member with 8,999 conflicts. Now the receiving node asks for at most
`MAX_LEAVES` revisions of a doc, refuses (that stream alone) a batch offering more than
`MAX_BATCH_REVISIONS`, and goes on serving."""

import trio

from plugshare.replication.protocol import (
    ACK,
    DIFF,
    DOCS,
    MAX_BATCH_REVISIONS,
    MISSING,
    OPEN,
    OPENED,
    PROTOCOL_VERSION,
    StreamEnded,
)
from plugshare.store.base import MAX_LEAVES
from tests.replication.test_replicator import (
    TIMEOUT,
    Node,
    Side,
    dial,
    leaves,
    revision,
    start_listener,
    stores,  # noqa: F401 (fixture)
)

FLOOD = 9000


def message(stream, message_type, **fields):
    return {"type": message_type, "share": "notes", "stream": stream, **fields}


async def test_a_flooded_batch_is_trimmed_an_oversized_one_refused_and_the_node_serves_on(stores):  # noqa: F811
    _, store_b = stores
    b = Side("b", store_b)
    evil = Node("evil")
    root = revision("flooded", {"doctype": "note", "v": 0})
    siblings = [revision("flooded", {"doctype": "note", "n": n}, parents=(root["_rev"],))
                for n in range(FLOOD)]
    async with trio.open_nursery() as nursery:
        port, listener = await start_listener(nursery, b.node,
                                              lambda connection: b.replicate(connection, evil.id))
        async with dial(port, b.node, evil) as connection:
            with trio.fail_after(TIMEOUT):
                await connection.send(message("flood", OPEN, v=PROTOCOL_VERSION))
                assert (await connection.receive())["type"] == OPENED
                # 9,000 siblings in one batch: only as many as a doc may hold are asked for.
                revs = {"flooded": [doc["_rev"] for doc in siblings]}
                await connection.send(message("flood", DIFF, batch=0, revs=revs))
                missing = await connection.receive()
                assert missing["type"] == MISSING
                assert len(missing["missing"]["flooded"]) == MAX_LEAVES
                asked = set(missing["missing"]["flooded"])
                await connection.send(message("flood", DOCS, batch=0, last=True,
                                              docs=[d for d in siblings if d["_rev"] in asked]))
                ack = await connection.receive()
                assert ack["type"] == ACK and ack["written"] == MAX_LEAVES

                # A batch over the cap: this stream is refused, saying why.
                over = {f"d{i}": [f"1-{i:032x}"] for i in range(MAX_BATCH_REVISIONS + 1)}
                await connection.send(message("flood", DIFF, batch=1, revs=over))
                refusal = await connection.receive()
                assert refusal["type"] == "rep.refuse" and refusal["stream"] == "flood"
                assert f"over the cap of {MAX_BATCH_REVISIONS}" in refusal["reason"]

                # The node serves on: a new stream on the same link is opened and written.
                good = revision("good", {"doctype": "note"})
                await connection.send(message("next", OPEN, v=PROTOCOL_VERSION))
                assert (await connection.receive())["type"] == OPENED
                await connection.send(message("next", DIFF, batch=0, revs={"good": [good["_rev"]]}))
                assert (await connection.receive())["missing"] == {"good": [good["_rev"]]}
                await connection.send(message("next", DOCS, batch=0, docs=[good], last=True))
                assert (await connection.receive())["written"] == 1
        listener.cancel()

    stored = await leaves(store_b)
    assert len(stored["flooded"][1]) == MAX_LEAVES
    assert "good" in stored and not any(doc_id.startswith("d") for doc_id in stored)
    [ended] = b.events.of(StreamEnded, direction="pull", reason=refusal["reason"])
    assert "protocol error" in ended.reason
