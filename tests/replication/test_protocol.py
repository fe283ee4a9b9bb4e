"""The replication protocol's state machines, driven against each other without sockets or
stores: messages go through the real frame encoder, the target's "store" is a set of known
revisions."""

from collections import deque

import msgpack
import pytest

from plugshare.replication.frames import FrameDecoder, encode
from plugshare.replication.protocol import (
    ACK,
    CAUGHT_UP,
    DIFF,
    DOCS,
    MAX_BATCH_REVISIONS,
    MISSING,
    OPEN,
    OPENED,
    PROTOCOL_VERSION,
    BatchAcked,
    BatchReceived,
    BatchSent,
    CaughtUp,
    DiffRevs,
    DocRefused,
    DocWithheld,
    Lag,
    LocalProtocolError,
    Opened,
    PeerEndedStream,
    ProtocolError,
    SaveCheckpoint,
    Send,
    SourceStream,
    TargetStream,
    WriteDocs,
    check_open,
    parse_stream_key,
)
from plugshare.store.base import MAX_LEAVES
from plugshare.store.revtree import compute_rev, history_of

SHARE, STREAM, PEER_A, PEER_B = "notes", "1", "aa" * 32, "bb" * 32


def revision(doc_id, body, parents=(), deleted=False):
    """A leaf revision as `bulk_get` returns it: real rev ids, `_revisions` newest first."""
    rev = compute_rev(parents[0] if parents else None, deleted, {} if deleted else body)
    doc = {"_id": doc_id, "_rev": rev, "_revisions": history_of((rev, *parents))}
    if deleted:
        doc["_deleted"] = True
    else:
        doc.update(body)
    return doc


def wire(message):
    """What the peer receives: the message through a real frame."""
    decoder = FrameDecoder()
    decoder.feed(encode(message))
    [received] = list(decoder)
    return received


def everything(doc):
    return True


def accept_all(peer, doc):
    return True, ""


class Harness:
    """Carries messages between a source and a target; the target's store is `known`."""

    def __init__(self, source=None, target=None, known=()):
        self.source = source or SourceStream(share=SHARE, stream=STREAM, peer=PEER_B, in_scope=everything)
        self.target = target or TargetStream(share=SHARE, stream=STREAM, peer=PEER_A, accept=accept_all)
        self.known = set(known)
        self.to_target = deque()
        self.to_source = deque()
        self.source_events = []
        self.target_events = []
        self.checkpoints = []
        self.written = []
        self.now = 0.0

    def from_source(self, outputs):
        for output in outputs:
            if isinstance(output, Send):
                self.to_target.append(wire(output.message))
            elif isinstance(output, SaveCheckpoint):
                self.checkpoints.append(output.seq)
            else:
                self.source_events.append(output)

    def from_target(self, outputs):
        for output in outputs:
            if isinstance(output, Send):
                self.to_source.append(wire(output.message))
            elif isinstance(output, DiffRevs):
                answer = {}
                for doc_id, revs in output.revs.items():
                    missing = [rev for rev in revs if (doc_id, rev) not in self.known]
                    if missing:
                        answer[doc_id] = {"missing": missing, "possible_ancestors": []}
                self.from_target(self.target.diff_result(output.batch, answer))
            elif isinstance(output, WriteDocs):
                self.written.extend(output.docs)
                self.known.update((doc["_id"], doc["_rev"]) for doc in output.docs)
                results = [{"id": doc["_id"], "rev": doc["_rev"], "ok": True} for doc in output.docs]
                self.from_target(self.target.write_result(output.batch, results))
            else:
                self.target_events.append(output)

    def open(self):
        self.to_target.append(wire(self.source.open_message()))
        check_open(self.to_target.popleft())
        self.from_target([Send(self.target.opened_message("target-store"))])
        self.deliver_to_source()

    def deliver_to_target(self):
        self.from_target(self.target.receive(self.to_target.popleft()))

    def deliver_to_source(self):
        self.from_source(self.source.receive(self.to_source.popleft(), self.now))

    def settle(self):
        while self.to_target or self.to_source:
            while self.to_target:
                self.deliver_to_target()
            while self.to_source:
                self.deliver_to_source()

    def of_type(self, events, kind):
        return [event for event in events if isinstance(event, kind)]


def opened_harness(**kwargs):
    harness = Harness(**kwargs)
    harness.open()
    return harness


# --- the happy path ---------------------------------------------------------------------------


def test_a_push_sends_only_what_the_target_lacks_and_checkpoints_after_each_ack():
    a1, b1 = revision("a", {"n": 1}), revision("b", {"n": 2})
    c1 = revision("c", {"n": 3})
    c2 = revision("c", {"n": 4}, parents=(c1["_rev"],))
    harness = opened_harness(known={("b", b1["_rev"])})
    assert harness.of_type(harness.source_events, Opened)[0].store == "target-store"

    harness.from_source(harness.source.add_batch([a1, b1], 10, now=0.0))
    harness.from_source(harness.source.add_batch([c2], 20, now=0.0))
    diff = harness.to_target[0]
    assert diff == {"type": DIFF, "share": SHARE, "stream": STREAM, "batch": 0,
                    "revs": {"a": [a1["_rev"]], "b": [b1["_rev"]]}}
    harness.settle()

    assert harness.written == [a1, c2]  # b was there already; c2 carries c1 in its history
    assert harness.checkpoints == [10, 20]
    assert harness.source.checkpoint == 20 and harness.source.in_flight == 0
    sent = harness.of_type(harness.source_events, BatchSent)
    assert [(event.batch, event.offered, event.sent) for event in sent] == [(0, 2, 1), (1, 1, 1)]
    acked = harness.of_type(harness.source_events, BatchAcked)
    assert [(event.batch, event.written, event.refused) for event in acked] == [(0, 1, 0), (1, 1, 0)]
    received = harness.of_type(harness.target_events, BatchReceived)
    assert [(event.batch, event.written) for event in received] == [(0, 1), (1, 1)]
    assert harness.source.lag(5.0) == Lag(share=SHARE, peer=PEER_B, pending_docs=0, seconds=0.0)


def test_a_batch_the_target_has_entirely_completes_on_the_missing_answer():
    a1 = revision("a", {"n": 1})
    harness = opened_harness(known={("a", a1["_rev"])})
    harness.from_source(harness.source.add_batch([a1], 7, now=0.0))
    harness.settle()
    assert harness.written == []
    assert harness.checkpoints == [7]
    assert not harness.of_type(harness.source_events, BatchAcked)  # no docs, so no ack


def test_conflicting_leaves_and_tombstones_are_offered_like_any_revision():
    base = revision("x", {"v": 0})
    left = revision("x", {"v": "left"}, parents=(base["_rev"],))
    right = revision("x", {"v": "right"}, parents=(base["_rev"],))
    gone = revision("y", {}, parents=(revision("y", {"v": 1})["_rev"],), deleted=True)
    harness = opened_harness()
    harness.from_source(harness.source.add_batch([left, right, gone], 3, now=0.0))
    harness.settle()
    assert sorted(doc["_rev"] for doc in harness.written) == sorted([left["_rev"], right["_rev"], gone["_rev"]])
    assert {"_id": "y", "_rev": gone["_rev"], "_revisions": gone["_revisions"], "_deleted": True} in harness.written


# --- checkpoints and the window ---------------------------------------------------------------


def test_the_checkpoint_only_moves_over_batches_complete_from_the_oldest_on():
    docs = [revision(f"d{n}", {"n": n}) for n in range(4)]
    harness = opened_harness()
    for n, doc in enumerate(docs):
        harness.from_source(harness.source.add_batch([doc], (n + 1) * 100, now=float(n)))
    while harness.to_target:
        harness.deliver_to_target()
    # The target answered every diff; the source reads the answers and sends the docs.
    for _ in range(4):
        harness.deliver_to_source()
    while harness.to_target:
        harness.deliver_to_target()
    acks = {message["batch"]: message for message in harness.to_source}
    assert sorted(acks) == [0, 1, 2, 3]
    harness.to_source.clear()

    harness.now = 10.0
    for batch in (3, 1):  # out of order, and not the oldest
        harness.from_source(harness.source.receive(acks[batch], harness.now))
    assert harness.checkpoints == []
    assert harness.source.checkpoint == 0 and harness.source.in_flight == 4
    assert harness.source.lag(10.0) == Lag(share=SHARE, peer=PEER_B, pending_docs=4, seconds=10.0)

    harness.from_source(harness.source.receive(acks[0], harness.now))
    assert harness.checkpoints == [200]  # batch 0 and the already acked batch 1
    assert harness.of_type(harness.source_events, Lag)[-1] == Lag(share=SHARE, peer=PEER_B, pending_docs=2, seconds=8.0)
    harness.from_source(harness.source.receive(acks[2], harness.now))
    assert harness.checkpoints == [200, 400]
    assert harness.source.in_flight == 0


def test_the_window_bounds_batches_in_flight_and_the_target_can_lower_it():
    source = SourceStream(share=SHARE, stream=STREAM, peer=PEER_B, in_scope=everything, max_in_flight=4)
    target = TargetStream(share=SHARE, stream=STREAM, peer=PEER_A, accept=accept_all, window=2)
    harness = Harness(source, target)
    assert not source.can_add_batch  # not opened yet
    with pytest.raises(LocalProtocolError, match="opening"):
        source.add_batch([revision("a", {})], 1, now=0.0)
    harness.open()
    assert source.window == 2
    harness.from_source(source.add_batch([revision("a", {})], 1, now=0.0))
    harness.from_source(source.add_batch([revision("b", {})], 2, now=0.0))
    assert not source.can_add_batch
    with pytest.raises(LocalProtocolError, match="2 of 2 batches in flight"):
        source.add_batch([revision("c", {})], 3, now=0.0)
    harness.settle()
    assert source.can_add_batch and harness.checkpoints == [1, 2]


def test_resuming_from_a_checkpoint_is_only_allowed_before_the_first_batch():
    harness = opened_harness()
    harness.source.resume_from(42)
    assert harness.source.checkpoint == 42
    harness.from_source(harness.source.add_batch([], 50, now=0.0))
    assert harness.checkpoints == [50]
    with pytest.raises(LocalProtocolError, match="before the first batch"):
        harness.source.resume_from(0)


# --- scope ------------------------------------------------------------------------------------


def test_revisions_out_of_scope_are_never_offered_and_their_batches_complete_at_once():
    def notes_only(doc):
        return doc.get("doctype") == "note"

    note, secret = revision("n", {"doctype": "note"}), revision("s", {"doctype": "secret"})
    harness = opened_harness(source=SourceStream(share=SHARE, stream=STREAM, peer=PEER_B, in_scope=notes_only))
    harness.from_source(harness.source.add_batch([secret], 5, now=0.0))
    assert harness.to_target == deque() and harness.checkpoints == [5]
    harness.from_source(harness.source.add_batch([note, secret], 9, now=0.0))
    assert harness.to_target[0]["revs"] == {"n": [note["_rev"]]}
    harness.settle()
    assert harness.written == [note] and harness.checkpoints == [5, 9]


def test_a_missing_answer_naming_revisions_not_offered_gets_only_the_offered_ones():
    def notes_only(doc):
        return doc.get("doctype") == "note"

    note, secret = revision("n", {"doctype": "note"}), revision("s", {"doctype": "secret"})
    harness = opened_harness(source=SourceStream(share=SHARE, stream=STREAM, peer=PEER_B, in_scope=notes_only))
    harness.from_source(harness.source.add_batch([note, secret], 9, now=0.0))
    harness.to_target.clear()
    made_up = "1-" + "f" * 32
    greedy = {"type": MISSING, "share": SHARE, "stream": STREAM, "batch": 0,
              "missing": {"n": [note["_rev"]], "s": [secret["_rev"]], "z": [made_up]}}
    harness.from_source(harness.source.receive(wire(greedy), 0.0))
    [docs_message] = harness.to_target
    assert docs_message["docs"] == [note] and docs_message["last"] is True
    withheld = harness.of_type(harness.source_events, DocWithheld)
    assert {(event.doc_id, event.rev) for event in withheld} == {("s", secret["_rev"]), ("z", made_up)}
    assert all("did not offer" in event.reason for event in withheld)


# --- what the source checks -------------------------------------------------------------------


def reply(message_type, **fields):
    return wire({"type": message_type, "share": SHARE, "stream": STREAM, **fields})


@pytest.mark.parametrize(
    "message, match",
    [
        (reply(MISSING, batch=5, missing={}), "batch 5, which is unknown"),
        (reply(ACK, batch=0, written=0, refused=[]), "batch 0, which is waiting for rep.missing"),
        (reply(MISSING, batch=True, missing={}), "batch must be an integer"),
        (reply(MISSING, batch=0, missing=[]), "must be a map"),
        (reply(MISSING, batch=0, missing={"a": ["2-xyz"]}), "invalid revision"),
        (reply(MISSING, batch=0, missing={"_local/x": ["1-" + "a" * 32]}), "local document"),
        (reply(OPENED, store="s", window=4), "a second rep.opened"),
    ],
)
def test_the_source_refuses_replies_that_break_the_protocol(message, match):
    harness = opened_harness()
    harness.from_source(harness.source.add_batch([revision("a", {})], 1, now=0.0))
    with pytest.raises(ProtocolError, match=match):
        harness.source.receive(message, 0.0)


def test_the_source_checks_the_ack_against_what_it_sent():
    harness = opened_harness()
    harness.from_source(harness.source.add_batch([revision("a", {})], 1, now=0.0))
    harness.deliver_to_target()
    harness.deliver_to_source()  # the missing answer: one doc sent
    for bad, match in [
        (reply(ACK, batch=0, written=2, refused=[]), r"written must be an integer in 0\.\.1"),
        (reply(ACK, batch=0, written=1, refused=[["a", "1-x", "no"]]), "at most 0"),
        (reply(ACK, batch=0, written=0, refused=[["a", 1]]), r"must be \[id, rev, reason\]"),
    ]:
        with pytest.raises(ProtocolError, match=match):
            harness.source.receive(bad, 0.0)
    harness.from_source(harness.source.receive(reply(ACK, batch=0, written=0, refused=[["a", "1-x", "full"]]), 0.0))
    [refused] = harness.of_type(harness.source_events, DocRefused)
    assert (refused.direction, refused.doc_id, refused.reason) == ("push", "a", "full")
    assert harness.checkpoints == [1]  # a refused doc is still done with


def test_opened_must_name_a_store_and_a_window_and_refuse_ends_the_stream():
    source = SourceStream(share=SHARE, stream=STREAM, peer=PEER_B, in_scope=everything)
    with pytest.raises(ProtocolError, match="before rep.opened"):
        source.receive(reply(MISSING, batch=0, missing={}), 0.0)
    with pytest.raises(ProtocolError, match="store must be"):
        source.receive(reply(OPENED, store="", window=4), 0.0)
    with pytest.raises(ProtocolError, match="window must be"):
        source.receive(reply(OPENED, store="s", window=0), 0.0)
    with pytest.raises(PeerEndedStream, match="not a member"):
        source.receive(reply("rep.refuse", reason="not a member"), 0.0)
    with pytest.raises(LocalProtocolError, match="ended"):
        source.receive(reply(OPENED, store="s", window=4), 0.0)


# --- what the target checks -------------------------------------------------------------------


def request(message_type, **fields):
    return wire({"type": message_type, "share": SHARE, "stream": STREAM, **fields})


def asked_target(*docs, accept=accept_all):
    """A target that has answered a diff of `docs` (batch 0) with: all missing."""
    target = TargetStream(share=SHARE, stream=STREAM, peer=PEER_A, accept=accept)
    revs = {}
    for doc in docs:
        revs.setdefault(doc["_id"], []).append(doc["_rev"])
    [action] = target.receive(request(DIFF, batch=0, revs=revs))
    answer = {doc_id: {"missing": doc_revs} for doc_id, doc_revs in revs.items()}
    [send] = target.diff_result(action.batch, answer)
    assert send.message["missing"] == revs
    return target


def forged(doc, **changes):
    return {**doc, **changes}


GOOD = revision("good", {"v": 1})
PARENT = revision("child", {"v": 0})
CHILD = revision("child", {"v": 1}, parents=(PARENT["_rev"],))


@pytest.mark.parametrize(
    "bad, reason",
    [
        (forged(CHILD, _revisions={"start": 2, "ids": [CHILD["_rev"][2:], "not-hex"]}), "not a 32 lowercase hex"),
        (forged(CHILD, _revisions={"start": 2, "ids": ["0" * 32, PARENT["_rev"][2:]]}), "does not match _revisions"),
        (forged(CHILD, _revisions={"start": 3, "ids": [CHILD["_rev"][2:], PARENT["_rev"][2:]]}), "does not match"),
        (forged(CHILD, _revisions={"start": 1, "ids": [CHILD["_rev"][2:], PARENT["_rev"][2:]]}), "generations below 1"),
        (forged(CHILD, _revisions=[CHILD["_rev"]]), "_revisions must be an object"),
        ({k: v for k, v in CHILD.items() if k != "_revisions"}, "no _revisions"),
    ],
)
def test_a_forged_history_is_refused_and_the_rest_of_the_batch_is_written(bad, reason):
    target = asked_target(GOOD, CHILD)
    outputs = target.receive(request(DOCS, batch=0, docs=[bad, GOOD], last=True))
    [refused, write] = outputs
    assert isinstance(refused, DocRefused) and refused.direction == "pull"
    assert (refused.doc_id, refused.rev) == ("child", CHILD["_rev"]) and reason in refused.reason
    assert write == WriteDocs(0, [GOOD], True)
    outputs = target.write_result(0, [{"id": "good", "rev": GOOD["_rev"], "ok": True}])
    ack = next(output.message for output in outputs if isinstance(output, Send))
    assert ack["type"] == ACK and ack["written"] == 1
    assert [entry[:2] for entry in ack["refused"]] == [["child", CHILD["_rev"]]]
    assert reason in ack["refused"][0][2]


def test_docs_not_asked_for_are_refused_whichever_way_they_come():
    other = revision("other", {"v": 1})
    target = asked_target(GOOD)
    outputs = target.receive(request(DOCS, batch=0, docs=[other, GOOD, GOOD, "junk"], last=False))
    refusals = [output for output in outputs if isinstance(output, DocRefused)]
    assert [(event.doc_id, event.reason) for event in refusals] == [
        ("other", "not asked for in batch 0 (or sent twice)"),
        ("good", "not asked for in batch 0 (or sent twice)"),  # the second copy
        ("", "not a document but a str"),
    ]
    assert outputs[-1] == WriteDocs(0, [GOOD], False)
    target.write_result(0, [{"ok": True}])
    # A batch that is not open: every doc refused, nothing to write.
    outputs = target.receive(request(DOCS, batch=7, docs=[other], last=True))
    assert [(event.doc_id, event.reason) for event in outputs] == [("other", "not asked for: batch 7 is not open")]


def test_accept_decides_each_doc_and_the_store_may_refuse_too():
    blocked = revision("blocked", {"v": 1})
    bad_body = revision("odd", {"v": 1})

    def accept(peer, doc):
        assert peer == PEER_A
        return (doc["_id"] != "blocked", "read-only member")

    target = asked_target(GOOD, blocked, bad_body, accept=accept)
    outputs = target.receive(request(DOCS, batch=0, docs=[GOOD, blocked, bad_body], last=True))
    assert [(event.doc_id, event.reason) for event in outputs[:-1]] == [("blocked", "refused: read-only member")]
    assert outputs[-1] == WriteDocs(0, [GOOD, bad_body], True)
    outputs = target.write_result(0, [{"ok": True}, {"id": "odd", "error": "bad_request", "reason": "no"}])
    ack = next(output.message for output in outputs if isinstance(output, Send))
    assert ack["written"] == 1
    assert [entry[0] for entry in ack["refused"]] == ["blocked", "odd"]
    assert ack["refused"][1][2] == "the store refused it: bad_request: no"
    [received] = [output for output in outputs if isinstance(output, BatchReceived)]
    assert (received.written, received.refused) == (1, 2)


def test_a_batch_may_be_sent_again_once_closed_but_not_while_open():
    harness = opened_harness()
    doc = revision("a", {"v": 1})
    diff = request(DIFF, batch=0, revs={"a": [doc["_rev"]]})
    harness.from_target(harness.target.receive(diff))
    with pytest.raises(ProtocolError, match="batch 0, which is already open"):
        harness.target.receive(diff)
    harness.from_target(harness.target.receive(request(DOCS, batch=0, docs=[doc], last=True)))
    assert harness.written == [doc]
    # The same batch again: harmless, the target now has it all and asks for nothing.
    harness.to_source.clear()
    harness.from_target(harness.target.receive(diff))
    assert harness.to_source[-1]["missing"] == {} and harness.target.open_batches == 0
    assert harness.written == [doc]


def test_the_target_enforces_its_window():
    target = TargetStream(share=SHARE, stream=STREAM, peer=PEER_A, accept=accept_all, window=1)
    [action] = target.receive(request(DIFF, batch=0, revs={"a": ["1-" + "a" * 32]}))
    target.diff_result(0, {"a": {"missing": ["1-" + "a" * 32]}})
    with pytest.raises(ProtocolError, match=r"1 batches are open \(window 1\)"):
        target.receive(request(DIFF, batch=1, revs={}))


@pytest.mark.parametrize(
    "message, match",
    [
        (request(DIFF, batch=-1, revs={}), "batch must be an integer"),
        (request(DIFF, batch=0, revs={"a": []}), "non-empty list"),
        (request(DIFF, batch=0, revs={"a": ["1-short"]}), "invalid revision"),
        (request(DIFF, batch=0, revs={"": ["1-" + "a" * 32]}), "_id must be a non-empty string"),
        (request(DIFF, batch=0, revs={"_design/x": ["1-" + "a" * 32]}), "only '_local/<name>' ids"),
        (request(DOCS, batch=0, docs={}, last=True), "docs \\(a list\\)"),
        (request(DOCS, batch=0, docs=[], last=1), "last \\(true or false\\)"),
        (request(OPEN, v=PROTOCOL_VERSION), "a second rep.open"),
    ],
)
def test_the_target_refuses_requests_that_break_the_protocol(message, match):
    target = TargetStream(share=SHARE, stream=STREAM, peer=PEER_A, accept=accept_all)
    with pytest.raises(ProtocolError, match=match):
        target.receive(message)


def test_the_target_makes_its_driver_finish_each_action_first():
    target = TargetStream(share=SHARE, stream=STREAM, peer=PEER_A, accept=accept_all)
    target.receive(request(DIFF, batch=0, revs={}))
    with pytest.raises(LocalProtocolError, match="still owed"):
        target.receive(request(CAUGHT_UP))
    with pytest.raises(LocalProtocolError, match="no write is owed"):
        target.write_result(0, [])
    target.diff_result(0, {})
    with pytest.raises(PeerEndedStream, match="bye"):
        target.receive(request("rep.end", reason="bye"))


@pytest.mark.parametrize(
    "message, match",
    [
        ({"type": "rep.nope", "share": SHARE, "stream": STREAM}, "not a replication message type"),
        ({"type": DIFF, "stream": STREAM}, "needs a share id"),
        ({"type": DIFF, "share": SHARE, "stream": "s" * 65}, "needs a share id"),
    ],
)
def test_messages_without_a_stream_key_are_refused(message, match):
    with pytest.raises(ProtocolError, match=match):
        parse_stream_key(message)


def test_open_names_the_protocol_version():
    source = SourceStream(share=SHARE, stream=STREAM, peer=PEER_B, in_scope=everything)
    assert check_open(wire(source.open_message())) == (SHARE, STREAM)
    with pytest.raises(ProtocolError, match="version 2 is not supported"):
        check_open({**source.open_message(), "v": 2})


# --- sizes and caught-up ----------------------------------------------------------------------


def test_docs_are_sent_in_messages_of_bounded_size_and_oversized_ones_are_withheld():
    docs = [revision(f"d{n}", {"blob": "x" * 400}) for n in range(10)]
    huge = revision("huge", {"blob": "y" * 5000})
    unpackable = revision("big-int", {"n": 2**70})
    source = SourceStream(share=SHARE, stream=STREAM, peer=PEER_B, in_scope=everything,
                          docs_message_bytes=1200, max_doc_bytes=2000)
    harness = opened_harness(source=source)
    harness.from_source(source.add_batch([*docs, huge, unpackable], 1, now=0.0))
    harness.deliver_to_target()
    harness.deliver_to_source()
    messages = list(harness.to_target)
    assert [len(message["docs"]) for message in messages] == [2, 2, 2, 2, 2]
    assert [message["last"] for message in messages] == [False] * 4 + [True]
    assert [doc for message in messages for doc in message["docs"]] == docs
    withheld = harness.of_type(harness.source_events, DocWithheld)
    assert [event.doc_id for event in withheld] == ["huge", "big-int"]
    assert "over the limit of 2000" in withheld[0].reason and "cannot be encoded" in withheld[1].reason
    harness.settle()
    assert harness.written == docs and harness.checkpoints == [1]
    # The encoded sizes measured for the batch: ten docs of ~520 bytes, a 5 KB one, and 0 for
    # the one msgpack cannot encode.
    assert 5000 / 12 < source.average_doc_bytes < 11000 / 12


def test_a_batch_whose_asked_docs_are_all_withheld_still_ends_with_a_last_message():
    huge = revision("huge", {"blob": "y" * 5000})
    source = SourceStream(share=SHARE, stream=STREAM, peer=PEER_B, in_scope=everything, max_doc_bytes=2000)
    harness = opened_harness(source=source)
    harness.from_source(source.add_batch([huge], 1, now=0.0))
    harness.deliver_to_target()
    harness.deliver_to_source()
    assert [(message["docs"], message["last"]) for message in harness.to_target] == [([], True)]
    harness.settle()
    assert harness.checkpoints == [1]
    [acked] = harness.of_type(harness.source_events, BatchAcked)
    assert (acked.written, acked.refused) == (0, 0)


def test_caught_up_is_reported_once_the_feed_is_drained_and_every_batch_complete():
    harness = opened_harness()
    harness.from_source(harness.source.add_batch([revision("a", {})], 1, now=0.0))
    harness.from_source(harness.source.feed_drained())
    assert not harness.of_type(harness.source_events, CaughtUp)  # batch 0 is in flight
    harness.settle()
    assert [event.direction for event in harness.of_type(harness.source_events, CaughtUp)] == ["push"]
    assert [event.direction for event in harness.of_type(harness.target_events, CaughtUp)] == ["pull"]
    harness.from_source(harness.source.feed_drained())
    assert len(harness.of_type(harness.source_events, CaughtUp)) == 1  # once per catch-up
    # A change out of scope does not make it report again; one in scope does.
    harness.from_source(harness.source.add_batch([], 2, now=2.0))
    harness.from_source(harness.source.feed_drained())
    assert len(harness.of_type(harness.source_events, CaughtUp)) == 1
    harness.from_source(harness.source.add_batch([revision("b", {})], 3, now=3.0))
    harness.settle()
    harness.from_source(harness.source.feed_drained())
    assert len(harness.of_type(harness.source_events, CaughtUp)) == 2
    assert [message["type"] for message in harness.to_target] == [CAUGHT_UP]


# --- progress: pending and bytes --------------------------------------------------------------


def packed_size(doc):
    return len(msgpack.packb(doc, use_bin_type=True))


def test_pending_and_sizes_reach_the_target_with_each_batch():
    a1, b1, c1 = revision("a", {"n": 1}), revision("b", {"n": 2}), revision("c", {"t": "x" * 300})
    harness = opened_harness(known={("b", b1["_rev"])})
    harness.from_source(harness.source.add_batch([a1, b1], 10, now=0.0, pending=7))
    harness.from_source(harness.source.add_batch([c1], 11, now=0.0, pending=0))
    assert [message["pending"] for message in harness.to_target] == [7, 0]
    harness.settle()

    received = harness.of_type(harness.target_events, BatchReceived)
    assert [(event.batch, event.written, event.pending) for event in received] == [(0, 1, 7), (1, 1, 0)]
    # b was not sent, so only a's size counts; each end measures the same encoding.
    assert [event.bytes for event in received] == [packed_size(a1), packed_size(c1)]
    acked = harness.of_type(harness.source_events, BatchAcked)
    assert [event.bytes for event in acked] == [packed_size(a1), packed_size(c1)]
    assert received[1].bytes > received[0].bytes > 0


def test_a_diff_without_pending_is_fine_and_says_nothing_of_it():
    harness = opened_harness()
    doc = revision("a", {"n": 1})
    harness.from_source(harness.source.add_batch([doc], 1, now=0.0))
    assert "pending" not in harness.to_target[0]  # what an older source sends
    harness.settle()
    [received] = harness.of_type(harness.target_events, BatchReceived)
    assert (received.written, received.pending, received.bytes) == (1, None, packed_size(doc))


def test_only_written_docs_count_in_the_bytes_received():
    blocked = revision("blocked", {"v": 1})
    target = asked_target(GOOD, blocked, accept=lambda peer, doc: (doc["_id"] != "blocked", "no"))
    outputs = target.receive(request(DOCS, batch=0, docs=[GOOD, blocked], last=True))
    assert outputs[-1] == WriteDocs(0, [GOOD], True)
    [received] = [o for o in target.write_result(0, [{"ok": True}]) if isinstance(o, BatchReceived)]
    assert (received.written, received.refused, received.bytes) == (1, 1, packed_size(GOOD))


@pytest.mark.parametrize("pending", [-1, 2**63, 1.5, "3", True, None, [1]])
def test_a_malformed_pending_breaks_the_protocol_and_opens_no_batch(pending):
    target = TargetStream(share=SHARE, stream=STREAM, peer=PEER_A, accept=accept_all)
    with pytest.raises(ProtocolError, match=r"rep.diff: pending must be an integer in 0\.\.2\*\*63-1 or absent"):
        target.receive(request(DIFF, batch=0, revs={"a": ["1-" + "a" * 32]}, pending=pending))
    assert target.open_batches == 0


@pytest.mark.parametrize("pending", [-1, 1.5, True])
def test_the_source_refuses_to_send_a_malformed_pending(pending):
    harness = opened_harness()
    with pytest.raises(ValueError, match="pending must be"):
        harness.source.add_batch([revision("a", {})], 1, now=0.0, pending=pending)
    assert harness.source.in_flight == 0


# --- how much one batch may hold -----------------------------------------------------------
# Seen on real nodes: a write member sent 9,000 sibling revisions of one doc in one batch and
# blocked the owner for 77 s. Documents now hold at most MAX_LEAVES leaves; a batch holds at
# most MAX_BATCH_REVISIONS revisions (what one token batch command takes), a peer offering
# more has its stream refused, and an honest source splits a page that would exceed it.


def siblings(n):
    """`n` distinct revisions of one doc: what a flooding member offers."""
    return [f"2-{i:032x}" for i in range(n)]


def test_a_diff_offering_more_revisions_than_a_batch_holds_breaks_the_protocol():
    target = TargetStream(share=SHARE, stream=STREAM, peer=PEER_A, accept=accept_all)
    flood = request(DIFF, batch=0, revs={"flooded": siblings(MAX_BATCH_REVISIONS + 1)})
    with pytest.raises(ProtocolError, match=f"over the cap of {MAX_BATCH_REVISIONS}"):
        target.receive(flood)
    assert target.open_batches == 0  # nothing was asked of the store
    refusal = target.refuse_message("protocol error: ...")
    assert refusal["type"] == "rep.refuse" and (refusal["share"], refusal["stream"]) == (SHARE, STREAM)

    spread = {f"d{i}": [f"1-{i:032x}"] for i in range(MAX_BATCH_REVISIONS + 1)}
    other = TargetStream(share=SHARE, stream=STREAM, peer=PEER_A, accept=accept_all)
    with pytest.raises(ProtocolError, match="revisions, over the cap"):
        other.receive(request(DIFF, batch=0, revs=spread))

    at_cap = TargetStream(share=SHARE, stream=STREAM, peer=PEER_A, accept=accept_all)
    [action] = at_cap.receive(request(DIFF, batch=0, revs={"flooded": siblings(MAX_BATCH_REVISIONS)}))
    assert isinstance(action, DiffRevs) and len(action.revs["flooded"]) == MAX_BATCH_REVISIONS


def test_a_batch_takes_no_more_docs_than_a_batch_holds():
    target = asked_target(GOOD)
    junk = [forged(GOOD, n=i) for i in range(MAX_BATCH_REVISIONS)]
    outputs = target.receive(request(DOCS, batch=0, docs=junk, last=False))
    assert len([o for o in outputs if isinstance(o, DocRefused)]) == MAX_BATCH_REVISIONS - 1
    target.write_result(0, [{"ok": True}])
    with pytest.raises(ProtocolError, match=f"more than {MAX_BATCH_REVISIONS} docs"):
        target.receive(request(DOCS, batch=0, docs=[GOOD], last=True))
    closed = TargetStream(share=SHARE, stream=STREAM, peer=PEER_A, accept=accept_all)
    with pytest.raises(ProtocolError, match=f"more than {MAX_BATCH_REVISIONS} docs"):
        closed.receive(request(DOCS, batch=3, docs=junk + [GOOD], last=True))


def test_a_batch_cap_fits_one_token_batch_command():
    from plugshare.token.door import MAX_BATCH

    assert MAX_BATCH_REVISIONS <= MAX_BATCH


def test_a_page_over_the_batch_cap_is_sent_as_several_batches_within_the_window():
    per_doc = 100  # MAX_LEAVES: conflicts a member may have made
    docs = []
    for d in range(MAX_BATCH_REVISIONS * 5 // (2 * per_doc)):  # 2.5 batches' worth
        root = revision(f"d{d}", {"v": 0})
        docs += [revision(f"d{d}", {"v": 1, "n": n}, parents=(root["_rev"],)) for n in range(per_doc)]
    source = SourceStream(share=SHARE, stream=STREAM, peer=PEER_B, in_scope=everything,
                          max_in_flight=2)
    harness = opened_harness(source=source)
    first = revision("first", {"v": 1})
    harness.from_source(harness.source.add_batch([first], 5, now=0.0))
    harness.settle()
    harness.from_source(harness.source.add_batch(docs, 10, now=0.0))
    diffs = [m for m in harness.to_target if m["type"] == DIFF]
    assert len(diffs) == 2  # the window is 2: the third waits for room
    assert not harness.source.can_add_batch

    sizes, checkpoints_seen = [], []
    while harness.to_target or harness.to_source:
        if harness.to_target:
            message = harness.to_target[0]
            if message["type"] == DIFF:
                sizes.append(sum(len(revs) for revs in message["revs"].values()))
            harness.deliver_to_target()
            assert harness.target.open_batches <= 2
        else:
            harness.deliver_to_source()
        checkpoints_seen.append(harness.source.checkpoint)
    assert sizes == [MAX_BATCH_REVISIONS, MAX_BATCH_REVISIONS, MAX_BATCH_REVISIONS // 2]
    assert len(harness.written) == len(docs) + 1
    # The checkpoint passes the page only once all of it is written.
    assert harness.checkpoints == [5, 5, 5, 10]
    assert set(checkpoints_seen) == {5, 10} and harness.source.checkpoint == 10
    assert harness.source.can_add_batch and harness.source.in_flight == 0
    sent = harness.of_type(harness.source_events, BatchSent)
    assert sum(event.offered for event in sent) == len(docs) + 1


def test_the_target_asks_for_no_more_revisions_of_a_doc_than_it_may_hold():
    harness = opened_harness()
    root = revision("flooded", {"v": 0})
    flood = [revision("flooded", {"n": n}, parents=(root["_rev"],)) for n in range(3 * MAX_LEAVES)]
    harness.from_source(harness.source.add_batch([*flood, GOOD], 10, now=0.0))
    harness.deliver_to_target()
    missing = harness.to_source[0]["missing"]
    assert missing["flooded"] == [doc["_rev"] for doc in flood[:MAX_LEAVES]]
    assert missing["good"] == [GOOD["_rev"]]
    harness.settle()
    assert harness.written == [*flood[:MAX_LEAVES], GOOD]
    assert harness.checkpoints == [10]
