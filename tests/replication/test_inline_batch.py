"""A small batch in one round trip (`rep.batch`): the source sends the docs with the offer,
the target drops what it holds, checks and writes the rest, and acknowledges. Driven like
test_protocol: the real state machines, messages through real frames, a set as the store."""

from __future__ import annotations

import pytest

from plugshare.replication.protocol import (
    ACK,
    BATCH,
    DIFF,
    MAX_INLINE_REVISIONS,
    MISSING,
    BatchAcked,
    BatchReceived,
    BatchSent,
    DiffRevs,
    DocRefused,
    ProtocolError,
    Send,
    SourceStream,
    TargetStream,
    WriteDocs,
)
from tests.replication.test_protocol import (
    PEER_A,
    PEER_B,
    SHARE,
    STREAM,
    Harness,
    accept_all,
    everything,
    revision,
    wire,
)

INLINE = 4


def source(inline_bytes=64 * 1024, **kwargs):
    return SourceStream(share=SHARE, stream=STREAM, peer=PEER_B, in_scope=everything,
                        inline_bytes=inline_bytes, **kwargs)


def target(inline=INLINE, accept=accept_all, **kwargs):
    return TargetStream(share=SHARE, stream=STREAM, peer=PEER_A, accept=accept, inline=inline, **kwargs)


class Recording(Harness):
    """The harness, keeping every message type that crossed, each way."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.crossed = []

    def deliver_to_target(self):
        self.crossed.append(self.to_target[0]["type"])
        super().deliver_to_target()

    def deliver_to_source(self):
        self.crossed.append(self.to_source[0]["type"])
        super().deliver_to_source()


def opened(**kwargs):
    harness = Recording(source=kwargs.pop("source", None) or source(),
                        target=kwargs.pop("target", None) or target(), **kwargs)
    harness.open()
    harness.crossed.clear()  # rep.opened
    return harness


def inline_message(batch, docs, **extra):
    return wire({"type": BATCH, "share": SHARE, "stream": STREAM, "batch": batch, "docs": docs, **extra})


def test_a_small_batch_goes_with_its_docs_and_is_acknowledged_in_one_round_trip():
    a1, b1 = revision("a", {"n": 1}), revision("b", {"n": 2})
    harness = opened()
    harness.from_source(harness.source.add_batch([a1, b1], 5, now=0.0, pending=0))
    assert harness.to_target[0]["type"] == BATCH
    assert harness.to_target[0]["docs"] == [a1, b1] and harness.to_target[0]["pending"] == 0
    assert harness.source.checkpoint == 0  # nothing passes before the ack
    harness.settle()

    assert harness.crossed == [BATCH, ACK]  # no rep.diff, no rep.missing
    assert harness.written == [a1, b1]
    assert harness.checkpoints == [5]
    [sent] = harness.of_type(harness.source_events, BatchSent)
    assert (sent.offered, sent.sent) == (2, 2)
    [acked] = harness.of_type(harness.source_events, BatchAcked)
    assert (acked.written, acked.refused) == (2, 0) and acked.bytes > 0
    [received] = harness.of_type(harness.target_events, BatchReceived)
    assert (received.written, received.refused, received.inline, received.pending) == (2, 0, True, 0)


def test_revisions_the_target_holds_are_dropped_not_written_nor_refused():
    a1, b1 = revision("a", {"n": 1}), revision("b", {"n": 2})
    harness = opened(known={("b", b1["_rev"])})
    harness.from_source(harness.source.add_batch([a1, b1], 5, now=0.0))
    harness.settle()
    assert harness.written == [a1]
    [acked] = harness.of_type(harness.source_events, BatchAcked)
    assert (acked.written, acked.refused) == (1, 0)
    assert not harness.of_type(harness.target_events, DocRefused)
    assert harness.checkpoints == [5]


def test_a_batch_the_target_holds_entirely_is_acknowledged_with_nothing_received():
    a1 = revision("a", {"n": 1})
    harness = opened(known={("a", a1["_rev"])})
    harness.from_source(harness.source.add_batch([a1], 5, now=0.0))
    harness.settle()
    assert harness.crossed == [BATCH, ACK] and harness.written == []
    assert harness.checkpoints == [5]
    assert not harness.of_type(harness.target_events, BatchReceived)  # as diff-first


def test_a_second_copy_in_the_same_batch_is_dropped():
    a1 = revision("a", {"n": 1})
    machine = target()
    machine.opened_message("store")
    [diff] = machine.receive(inline_message(0, [a1, a1]))
    assert diff == DiffRevs(0, {"a": [a1["_rev"]]})
    outputs = machine.diff_result(0, {"a": {"missing": [a1["_rev"]]}})
    [write] = [o for o in outputs if isinstance(o, WriteDocs)]
    assert write.docs == [a1] and write.last
    outputs = machine.write_result(0, [{"id": "a", "rev": a1["_rev"], "ok": True}])
    [ack] = [o.message for o in outputs if isinstance(o, Send)]
    assert (ack["written"], ack["refused"]) == (1, [])


def test_big_or_many_revisions_keep_the_diff_first_path():
    big = [revision(f"d{n}", {"blob": "x" * 30_000}) for n in range(3)]  # ~90 KB: over 64 KB
    harness = opened()
    harness.from_source(harness.source.add_batch(big, 3, now=0.0))
    assert harness.to_target[0]["type"] == DIFF
    harness.settle()
    assert harness.crossed[:2] == [DIFF, MISSING] and len(harness.written) == 3

    many = [revision(f"m{n}", {"n": n}) for n in range(INLINE + 1)]  # over the target's count
    harness = opened()
    harness.from_source(harness.source.add_batch(many, 3, now=0.0))
    assert harness.to_target[0]["type"] == DIFF
    harness.settle()
    assert len(harness.written) == INLINE + 1

    two = [revision(f"t{n}", {"blob": "x" * 600}) for n in range(2)]  # over one docs message
    harness = opened(source=source(docs_message_bytes=1000))
    harness.from_source(harness.source.add_batch(two, 3, now=0.0))
    assert harness.to_target[0]["type"] == DIFF


def test_an_older_target_or_a_source_with_inline_off_gets_diff_first_only():
    a1 = revision("a", {"n": 1})
    old_target = TargetStream(share=SHARE, stream=STREAM, peer=PEER_A, accept=accept_all)
    assert "inline" not in old_target.opened_message("store")
    harness = opened(target=old_target)
    harness.from_source(harness.source.add_batch([a1], 1, now=0.0))
    harness.settle()
    assert harness.crossed == [DIFF, MISSING, "rep.docs", ACK] and harness.written == [a1]

    harness = opened(source=source(inline_bytes=0))
    harness.from_source(harness.source.add_batch([a1], 1, now=0.0))
    assert harness.to_target[0]["type"] == DIFF


def test_a_doc_the_target_refuses_is_reported_and_the_rest_written():
    good, bad = revision("good", {"ok": True}), revision("bad", {"ok": False})

    def accept(peer, doc):
        return (doc["ok"], "not ok")

    harness = opened(target=target(accept=accept))
    harness.from_source(harness.source.add_batch([good, bad], 2, now=0.0))
    harness.settle()
    assert harness.written == [good]
    [refused] = harness.of_type(harness.source_events, DocRefused)
    assert (refused.direction, refused.doc_id, refused.reason) == ("push", "bad", "refused: not ok")
    assert harness.checkpoints == [2]  # the batch is complete: the refusal is the target's word


def test_hostile_docs_in_a_batch_are_refused_one_by_one():
    good = revision("good", {"n": 1})
    forged = {**revision("forged", {"n": 2}), "_revisions": {"start": 9, "ids": ["nope"]}}
    bare = {key: value for key, value in revision("bare", {"n": 3}).items() if key != "_revisions"}
    local = {**revision("x", {"n": 4}), "_id": "_local/x"}
    machine = target(inline=8)
    machine.opened_message("store")
    docs = [good, "not a doc", forged, bare, local, {"_id": "y", "_rev": "oops"}]
    [diff] = machine.receive(inline_message(0, docs))
    assert diff.revs == {"good": [good["_rev"]], "forged": [forged["_rev"]], "bare": [bare["_rev"]]}
    outputs = machine.diff_result(0, {doc_id: {"missing": revs} for doc_id, revs in diff.revs.items()})
    [write] = [o for o in outputs if isinstance(o, WriteDocs)]
    assert write.docs == [good]
    refused = {(o.doc_id, o.reason.split(":")[0]) for o in outputs if isinstance(o, DocRefused)}
    assert refused == {("", "not a document but a str"), ("forged", "forged or malformed history"),
                       ("bare", "no _revisions"), ("_local/x", "no valid _id and _rev"),
                       ("y", "no valid _id and _rev")}
    [ack] = [o.message for o in machine.write_result(0, [{"ok": True}]) if isinstance(o, Send)]
    assert ack["written"] == 1 and len(ack["refused"]) == 5


@pytest.mark.parametrize("message, error", [
    (inline_message(0, [revision(f"d{n}", {}) for n in range(INLINE + 1)]), "over the 4 this node takes"),
    (inline_message(0, []), "non-empty list"),
    (inline_message(0, {"a": 1}), "non-empty list"),
    (inline_message(-1, [revision("a", {})]), "batch must be an integer"),
    (inline_message(0, [revision("a", {})], pending="many"), "pending must be"),
])
def test_a_malformed_or_oversized_batch_breaks_the_protocol(message, error):
    machine = target()
    machine.opened_message("store")
    with pytest.raises(ProtocolError, match=error):
        machine.receive(message)


def test_a_batch_on_a_stream_that_did_not_offer_it_breaks_the_protocol():
    machine = target(inline=0)
    with pytest.raises(ProtocolError, match="did not offer it"):
        machine.receive(inline_message(0, [revision("a", {})]))


def test_a_batch_over_the_window_or_already_open_breaks_the_protocol():
    a1 = revision("a", {"n": 1})
    machine = target(window=1)
    [diff] = machine.receive(wire({"type": DIFF, "share": SHARE, "stream": STREAM, "batch": 0,
                                   "revs": {"a": [a1["_rev"]]}}))
    machine.diff_result(0, {"a": {"missing": [a1["_rev"]]}})  # batch 0 waits for its docs
    with pytest.raises(ProtocolError, match="already open"):
        machine.receive(inline_message(0, [a1]))
    with pytest.raises(ProtocolError, match="window 1"):
        machine.receive(inline_message(1, [revision("b", {})]))


def test_the_source_refuses_a_missing_for_an_inline_batch_and_a_bad_inline_count():
    a1 = revision("a", {"n": 1})
    harness = opened()
    harness.from_source(harness.source.add_batch([a1], 1, now=0.0))
    missing = wire({"type": MISSING, "share": SHARE, "stream": STREAM, "batch": 0,
                    "missing": {"a": [a1["_rev"]]}})
    with pytest.raises(ProtocolError, match="which is waiting for rep.ack"):
        harness.source.receive(missing, 0.0)

    fresh = source()
    fresh.open_message()
    for bad in (-1, MAX_INLINE_REVISIONS + 1, "16", True):
        opened_message = wire({"type": "rep.opened", "share": SHARE, "stream": STREAM,
                               "store": "s", "window": 4, "inline": bad})
        with pytest.raises(ProtocolError, match="inline must be"):
            fresh.receive(opened_message, 0.0)


def test_an_ack_claiming_more_than_was_sent_breaks_the_protocol():
    a1 = revision("a", {"n": 1})
    harness = opened()
    harness.from_source(harness.source.add_batch([a1], 1, now=0.0))
    ack = wire({"type": ACK, "share": SHARE, "stream": STREAM, "batch": 0, "written": 2, "refused": []})
    with pytest.raises(ProtocolError, match="written must be"):
        harness.source.receive(ack, 0.0)
    assert harness.source.checkpoint == 0
