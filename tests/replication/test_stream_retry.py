"""Streams that end for a passing cause start again by themselves; the others do not.

The back-off and the classification of endings are pure (`plugshare.replication.retry`); the
replicator is run over real pinned-TLS links between real stores, one of them on a
pouchdb-server this test kills and starts again (its data on disk), so the store errors are the
ones a node meets when its CouchDB restarts.
"""

import random

import pytest
import trio

from plugshare.replication.backoff import Backoff
from plugshare.replication.protocol import (
    PeerEndedStream,
    ProtocolError,
    StreamEnded,
    StreamStarted,
    SourceStream,
    TargetStream,
    refusal,
)
from plugshare.replication.retry import (
    STREAM_BACKOFF,
    GateRefused,
    GateUnavailable,
    StreamRetry,
    ending_of,
)
from plugshare.replication.replicator import PeerReplication, store_instance_id
from plugshare.store.base import StoreError, Unavailable
from plugshare.store.couchdb import CouchDBStore
from plugshare.store.sqlite import SQLiteStore
from tests.replication.test_replicator import Side, everything, linked, until, wait_for_doc
from tests.support.pouchdb_disk import PouchDBOnDisk


# --- the policy (pure) --------------------------------------------------------------------------


def test_the_delay_doubles_from_half_a_second_to_thirty_and_starts_over_after_a_success():
    retry = StreamRetry(Backoff(initial=0.5, maximum=30.0, multiplier=2.0, jitter=0.0))
    assert [retry.next_delay() for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    retry.succeeded()
    assert retry.next_delay() == 0.5


def test_the_default_back_off_is_jittered_within_its_bounds():
    retry = StreamRetry(rng=random.Random(7))
    assert retry.backoff == STREAM_BACKOFF
    delays = [retry.next_delay() for _ in range(40)]
    assert all(0 < d <= 30.0 for d in delays)
    assert 0.4 <= delays[0] <= 0.5 and delays[-1] >= 24.0  # 20 % jitter at most


def test_passing_causes_are_retried_and_refusals_are_not():
    assert ending_of(Unavailable("CouchDB is unreachable")).passing
    assert ending_of(StoreError("the store is closed")).passing
    assert ending_of(GateUnavailable("the token is restarting")).passing
    assert ending_of(PeerEndedStream("its store failed", retry=True)).passing
    for permanent in (PeerEndedStream("this node does not accept share 'x' from you"),
                      ProtocolError("a batch out of the window"),
                      GateRefused("the peer is no longer a member")):
        ending = ending_of(permanent)
        assert not ending.passing, permanent
    assert not ending_of(PeerEndedStream("x", retry=True)).tell_peer  # it ended it itself
    assert ending_of(ValueError("a bug")) is None


def test_the_retry_flag_crosses_the_wire_both_ways():
    target = TargetStream(share="s", stream="1", peer="p")
    assert target.refuse_message("down", retry=True)["retry"] is True
    assert "retry" not in refusal("s", "1", "no such share")
    source = SourceStream(share="s", stream="1", peer="p")
    with pytest.raises(PeerEndedStream) as ended:
        source.receive(refusal("s", "1", "down", retry=True), 0.0)
    assert ended.value.retry
    end = SourceStream(share="s", stream="2", peer="p").end_message("down", retry=True)
    target = TargetStream(share="s", stream="2", peer="p")
    with pytest.raises(PeerEndedStream) as ended:
        target.receive(end)
    assert ended.value.retry


# --- the replicator ----------------------------------------------------------------------------


@pytest.fixture
def pouchdb(tmp_path):
    server = PouchDBOnDisk(tmp_path / "pouchdb")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_a_store_that_goes_down_mid_sync_is_caught_up_once_back_without_a_new_link(
        tmp_path, pouchdb):
    store_a = await SQLiteStore.open(tmp_path / "a.sqlite")
    store_b = await CouchDBStore.open(pouchdb.url, "retry-b")
    try:
        a = Side("a", store_a, pushes={"notes": everything})
        b = Side("b", store_b, pushes={"notes": everything})
        rev1 = await store_a.put({"_id": "before", "doctype": "note"})
        async with linked(a, b):
            await wait_for_doc(b, "before", rev1)
            await trio.to_thread.run_sync(lambda: pouchdb.stop(kill=True))
            rev2 = await store_a.put({"_id": "while-down", "doctype": "note"})
            # a's push meets b's dead store: b refuses the stream as passing, a waits to retry.
            retrying = await until(lambda: a.events.of(StreamEnded, direction="push", passing=True),
                                   a.events)
            assert retrying[0].retry_in is not None and 0 < retrying[0].retry_in <= 30
            await trio.to_thread.run_sync(pouchdb.start)
            await wait_for_doc(b, "while-down", rev2)
            # Both ways still flow on the same link.
            rev3 = await store_b.put({"_id": "after", "doctype": "note"})
            await wait_for_doc(a, "after", rev3)
        assert len(a.events.of(StreamStarted, direction="push")) >= 2
        assert not [e for e in a.events.of(StreamEnded) + b.events.of(StreamEnded)
                    if not e.passing and "connection closed" not in e.reason]
    finally:
        await store_a.aclose()
        await store_b.aclose()


class FlakyGate:
    """A gate whose decider is away for the first `away` batches each way (as the token is
    while its supervisor restarts it), then lets everything through."""

    def __init__(self, away: int):
        self.away = {"outgoing": away, "incoming": away}

    def _check(self, way):
        if self.away[way] > 0:
            self.away[way] -= 1
            raise GateUnavailable("the token process is restarting")

    async def outgoing(self, share, docs):
        self._check("outgoing")
        return docs

    async def incoming(self, share, docs, existing):
        self._check("incoming")
        return docs


class RefusingGate:
    async def outgoing(self, share, docs):
        raise GateRefused("the peer is no longer a member")

    async def incoming(self, share, docs, existing):
        return docs


class GatedSide(Side):
    """A side whose replicator asks `gate` about each batch."""

    gate = None

    async def replicate(self, connection, peer_id):
        self.store_id = self.store_id or await store_instance_id(self.store)
        replication = PeerReplication(
            connection, self.store, peer=peer_id.hex(), store_id=self.store_id,
            accept_share=self.accept_share, on_event=self.events, config=self.config,
            gate=self.gate)
        async with trio.open_nursery() as nursery:
            await nursery.start(replication.run)
            for share, in_scope in self.pushes.items():
                replication.start_push(share, in_scope=in_scope)


async def test_a_gate_away_for_a_while_delays_a_push_and_a_refusing_one_ends_it_for_good(tmp_path):
    stores = [await SQLiteStore.open(tmp_path / f"{n}.sqlite") for n in "abc"]
    try:
        for name, store in zip("abc", stores):
            await store.put({"_id": f"from-{name}", "doctype": "note"})
        a, b, c = (GatedSide(n, s, pushes={"notes": everything}) for n, s in zip("abc", stores))
        a.gate, b.gate, c.gate = FlakyGate(away=2), FlakyGate(away=1), RefusingGate()
        async with linked(a, b):
            await wait_for_doc(b, "from-a")
            await wait_for_doc(a, "from-b")
        assert a.events.of(StreamEnded, direction="push", passing=True)
        async with linked(c, b):
            ended = await until(lambda: c.events.of(StreamEnded, direction="push"), c.events)
            await wait_for_doc(c, "from-b")  # the other way flows on
        assert not ended[0].passing and ended[0].retry_in is None
        assert "no longer a member" in ended[0].reason
        assert len(c.events.of(StreamStarted, direction="push")) == 1
    finally:
        for store in stores:
            await store.aclose()


class MiscountingGate:
    """A gate with a bug: it answers for fewer docs than it was asked about."""

    async def outgoing(self, share, docs):
        return docs

    async def incoming(self, share, docs, existing):
        return docs[:-1]


async def test_a_failure_no_stream_expects_ends_that_stream_only_never_the_link(tmp_path):
    stores = [await SQLiteStore.open(tmp_path / f"{n}.sqlite") for n in "ab"]
    try:
        for name, store in zip("ab", stores):
            await store.put({"_id": f"from-{name}", "doctype": "note"})
        a, b = (GatedSide(n, s, pushes={"notes": everything}) for n, s in zip("ab", stores))
        a.gate, b.gate = FlakyGate(away=0), MiscountingGate()
        async with linked(a, b):
            ended = await until(lambda: a.events.of(StreamEnded, direction="push"), a.events)
            await wait_for_doc(a, "from-b")  # b's push to a goes on, on the same link
            rev = await stores[1].put({"_id": "later", "doctype": "note"})
            await wait_for_doc(a, "later", rev)
        assert not ended[0].passing and "this node failed" in ended[0].reason
        [pull_end] = b.events.of(StreamEnded, direction="pull", share="notes")
        assert "this node failed" in pull_end.reason
    finally:
        for store in stores:
            await store.aclose()
