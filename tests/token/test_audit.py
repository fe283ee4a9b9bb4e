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
