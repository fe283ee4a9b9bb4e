"""The audit log: hash chain, sealed segments, damage detection, bounded memory."""

from __future__ import annotations

import pytest

from plugshare.token.inside import OWNER, AuthenticationError, Principal, Token, TokenStateError
from plugshare.token.audit import REFUSAL_WINDOW, chain_hash, genesis_hash

NOTES = "io.plugshare.notes"


@pytest.fixture
def small_segments(monkeypatch) -> None:
    monkeypatch.setattr("plugshare.token.audit.SEGMENT_MAX_BYTES", 600)


def fill(token: Token, n: int, flush_every: int = 7) -> None:
    for i in range(n):
        token.decide(OWNER, "read", {"doctype": NOTES, "_id": f"doc-{i}"})
        if i % flush_every == 0:
            token.flush()
    token.flush()


def segments(token: Token) -> list:
    return sorted((token._dir / "audit").glob("*.seg"))


def test_chain_verifies_and_can_be_rechecked_outside(token, small_segments) -> None:
    fill(token, 100)
    assert len(segments(token)) > 3
    ok, n, bad = token.audit_verify()
    assert (ok, bad) == (True, None) and n == token.info().audit_entries
    entries = token.audit_tail(n)
    assert [e.seq for e in entries] == list(range(n))
    head = genesis_hash(token.fingerprint)
    for entry in entries:
        head = chain_hash(head, entry.fields())
        assert head == entry.hash
    assert entries[-1].doc_id == "doc-99"


def test_tail_spans_segments_and_includes_unflushed_entries(token, small_segments) -> None:
    fill(token, 60)
    token.decide(OWNER, "write", {"doctype": NOTES, "_id": "not-flushed-yet"})
    tail = token.audit_tail(25)
    assert len(tail) == 25
    assert tail[-1].doc_id == "not-flushed-yet"
    assert [e.doc_id for e in tail[:-1]] == [f"doc-{i}" for i in range(36, 60)]
    assert token.audit_tail(0) == []


def test_a_tampered_segment_is_found_and_located(token, small_segments) -> None:
    fill(token, 80)
    ok, n, _ = token.audit_verify()
    assert ok
    seg = segments(token)[1]
    first_seq_of_seg = token._audit.meta.segments[1].first_seq
    data = bytearray(seg.read_bytes())
    data[30] ^= 0x01  # inside the first record's ciphertext
    seg.write_bytes(bytes(data))
    assert token.audit_verify() == (False, n, first_seq_of_seg)
    with pytest.raises(TokenStateError, match="damaged"):
        token.audit_tail(n)


def test_a_removed_segment_is_found(token, small_segments) -> None:
    fill(token, 80)
    _, n, _ = token.audit_verify()
    victim = segments(token)[2]
    victim.unlink()
    ok, total, bad = token.audit_verify()
    assert not ok and total == n and bad == token._audit.meta.segments[2].first_seq


def test_a_truncated_open_segment_refuses_open(token, make_keystore) -> None:
    fill(token, 20)
    state_dir = token._dir
    token.close()
    seg = sorted((state_dir / "audit").glob("*.seg"))[-1]
    seg.write_bytes(seg.read_bytes()[:-10])
    with pytest.raises(TokenStateError, match="truncated"):
        Token.open(state_dir, make_keystore())


def test_bytes_after_the_recorded_end_are_a_crash_trace_and_dropped(token, make_keystore) -> None:
    fill(token, 20)
    state_dir = token._dir
    token.close()
    seg = sorted((state_dir / "audit").glob("*.seg"))[-1]
    intact = seg.read_bytes()
    seg.write_bytes(intact + b"half-written record")
    token = Token.open(state_dir, make_keystore())
    try:
        assert seg.read_bytes() == intact
        token.decide(OWNER, "read", {"doctype": NOTES, "_id": "after"})
        token.flush()
        assert token.audit_verify()[0]
        assert token.audit_tail(1)[0].doc_id == "after"
    finally:
        token.close()


def test_log_survives_reopen(token, make_keystore, small_segments) -> None:
    fill(token, 40)
    _, n, _ = token.audit_verify()
    state_dir = token._dir
    token.close()
    token = Token.open(state_dir, make_keystore())
    try:
        ok, total, _ = token.audit_verify()
        assert ok and total == n
        assert token.audit_tail(1)[0].doc_id == "doc-39"
    finally:
        token.close()


# --- refusals of callers the token could not identify --------------------------------------
# A local process sending bad credentials made one entry and one flush (three fsyncs) per
# request (500 bad requests: 80 KB of log). They are counted now: the first of a kind in a
# window is logged at once, the rest as one entry with a count when the window closes.

UNKNOWN = "ps1.0000000000000000." + "A" * 43
MALFORMED = "garbage"


def refuse(token: Token, credential: str, times: int) -> None:
    for _ in range(times):
        with pytest.raises(AuthenticationError):
            token.authenticate(credential)
        token.flush()  # as the token process does after each answer


def audit_bytes(token: Token) -> int:
    return sum(path.stat().st_size for path in segments(token))


def refusals(token: Token, since: int) -> list:
    return [e for e in token.audit_tail(100_000)
            if e.seq >= since and e.principal == "anonymous" and e.action == "authenticate"]


def test_refusals_of_unidentified_callers_are_counted_not_logged_one_by_one(token) -> None:
    token.flush()
    start = token.info().audit_entries
    refuse(token, UNKNOWN, 1)
    refuse(token, MALFORMED, 1)
    logged = audit_bytes(token)
    refuse(token, UNKNOWN, 299)
    refuse(token, MALFORMED, 199)
    assert audit_bytes(token) == logged  # nothing written, no fsync, for the other 498

    entries = refusals(token, start)  # reading the log closes the open windows
    assert len(entries) == 4
    assert sum(e.count for e in entries) == 500
    assert sorted(e.count for e in entries) == [1, 1, 199, 299]
    assert not any(e.allowed for e in entries)
    summary = next(e for e in entries if e.count == 299)
    assert "unknown or revoked credential" in summary.reason and "299" in summary.reason
    ok, n, bad = token.audit_verify()
    assert (ok, bad) == (True, None)
    head = genesis_hash(token.fingerprint)  # the counts are in the hash chain
    for entry in token.audit_tail(n):
        head = chain_hash(head, entry.fields())
        assert head == entry.hash


def test_a_window_closes_by_itself_and_the_next_refusal_is_logged_again(
        token, monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("plugshare.token.audit._clock", lambda: now[0])
    token.flush()
    start = token.info().audit_entries
    refuse(token, UNKNOWN, 10)
    logged = audit_bytes(token)
    now[0] += REFUSAL_WINDOW
    token.flush()  # the next flush after the window writes its count, with no reader
    assert audit_bytes(token) > logged
    refuse(token, UNKNOWN, 1)  # a new window: logged at once
    assert [e.count for e in refusals(token, start)] == [1, 9, 1]


def test_counted_refusals_survive_a_restart(token, make_keystore) -> None:
    token.flush()
    start = token.info().audit_entries
    refuse(token, UNKNOWN, 50)
    state_dir = token._dir
    token.close()
    token = Token.open(state_dir, make_keystore())
    try:
        assert [e.count for e in refusals(token, start)] == [1, 49]
        assert token.audit_verify()[0]
    finally:
        token.close()


def test_refusals_of_identified_callers_stay_one_entry_each(token) -> None:
    token.add_app("notes", NOTES, "read")
    app = Principal("app", "notes")
    token.flush()
    start = token.info().audit_entries
    for i in range(50):
        assert not token.decide(app, "write", {"doctype": NOTES, "_id": f"d{i}"}).allowed
    entries = [e for e in token.audit_tail(100_000) if e.seq >= start]
    assert [e.doc_id for e in entries] == [f"d{i}" for i in range(50)]
    assert all(e.count == 1 and not e.allowed for e in entries)


# --- reading what matters, and keeping the log bounded -----------------------------------
# Every owner read is an entry (thousands in minutes): `audit` filters (denied, principal,
# since) and `prune` drops whole old segments while the chain stays verifiable from a
# checkpoint kept in the sealed state.


def test_search_filters_by_outcome_principal_and_time(token, small_segments, monkeypatch) -> None:

    fill(token, 30)
    cut = token.audit_tail(1)[0].time
    app = Principal("app", "notes")
    for i in range(5):
        token.decide(app, "read", {"doctype": NOTES, "_id": f"app-{i}"})  # refused: no rule
    token.flush()
    denied = token.audit_search(100, allowed=False)
    assert [e.doc_id for e in denied] == [f"app-{i}" for i in range(5)]
    assert all(not e.allowed for e in denied)
    assert [e.doc_id for e in token.audit_search(2, principal="app:notes")] == ["app-3", "app-4"]
    owner_reads = token.audit_search(1000, principal="owner:owner", allowed=True)
    assert len(owner_reads) >= 30 and all(e.allowed for e in owner_reads)
    recent = token.audit_search(1000, since=cut + 1e-6)
    assert {e.doc_id for e in recent} >= {f"app-{i}" for i in range(5)}
    assert "doc-0" not in {e.doc_id for e in recent}


def test_prune_drops_old_segments_and_the_chain_still_verifies(token, make_keystore,
                                                               small_segments) -> None:
    fill(token, 120)
    before = len(segments(token))
    assert before > 4
    cut = token.audit_tail(1)[0].time + 1e-6
    fill_later = [f"later-{i}" for i in range(10)]
    for doc_id in fill_later:
        token.decide(OWNER, "read", {"doctype": NOTES, "_id": doc_id})
    token.flush()
    result = token.audit_prune(cut)
    assert result["segments"] >= before - 2 and result["entries"] > 0
    assert len(segments(token)) < before
    ok, total, bad = token.audit_verify()
    assert (ok, bad) == (True, None)
    kept = token.audit_tail(100_000)
    assert kept[0].seq == result["verifiable_from"]
    assert {e.doc_id for e in kept} >= set(fill_later)
    assert any(e.action == "audit_prune" for e in kept)  # the pruning is itself audited
    # and the checkpoint survives a restart; editing a kept segment is still found
    state_dir = token._dir
    token.close()
    token = Token.open(state_dir, make_keystore())
    try:
        assert token.audit_verify()[0]
        seg = segments(token)[0]
        data = bytearray(seg.read_bytes())
        data[40] ^= 1
        seg.write_bytes(bytes(data))
        assert token.audit_verify()[0] is False
    finally:
        token.close()


def test_prune_never_drops_the_open_segment_nor_anything_newer(token, small_segments) -> None:
    fill(token, 20)
    result = token.audit_prune(token.audit_tail(1)[0].time + 3600)  # "everything"
    assert token.audit_verify()[0]
    assert token._audit.meta.segments  # the segment being written to stays
    assert token.audit_tail(1)[0].action == "audit_prune"
    assert result["entries"] >= 0
