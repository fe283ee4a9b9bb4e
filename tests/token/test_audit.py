"""The audit log: hash chain, sealed segments, damage detection, bounded memory."""

from __future__ import annotations

import pytest

from plugshare.token.inside import OWNER, Token, TokenStateError
from plugshare.token.audit import chain_hash, genesis_hash

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
