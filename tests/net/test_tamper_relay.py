"""The cheating relay's record surgery (tests/support/tamper_relay.py), sans-I/O: each cheat
hits exactly the record it says, whatever the chunking, and an honest pass changes nothing."""

from __future__ import annotations

import pytest

from tests.support.tamper_relay import RecordTamper


def record(kind: int, body: bytes) -> bytes:
    return bytes([kind, 3, 3]) + len(body).to_bytes(2, "big") + body


HELLO = record(0x16, b"client hello")
CCS = record(0x14, b"\x01")
FIRST = record(0x17, b"first encrypted record")
SECOND = record(0x17, b"second encrypted record")
STREAM = HELLO + CCS + FIRST + SECOND


def run(mode: str, chunk: int) -> tuple[bytes, list[str]]:
    events: list[str] = []
    tamper = RecordTamper(mode, events.append)
    out = b"".join(tamper.feed(STREAM[i:i + chunk]) for i in range(0, len(STREAM), chunk))
    return out, events


@pytest.mark.parametrize("chunk", [1, 3, 7, len(STREAM)])
def test_each_cheat_hits_the_first_encrypted_record_only(chunk):
    assert run("honest", chunk) == (STREAM, [])

    flipped, events = run("flip", chunk)
    assert events == ["flip"] and len(flipped) == len(STREAM)
    differing = [i for i, (a, b) in enumerate(zip(flipped, STREAM)) if a != b]
    start = len(HELLO + CCS)
    assert len(differing) == 1 and start + 5 <= differing[0] < start + len(FIRST)

    replayed, events = run("replay", chunk)
    assert events == ["replay"] and replayed == HELLO + CCS + FIRST + FIRST + SECOND


def test_a_partial_record_is_held_until_complete():
    tamper = RecordTamper("honest", lambda event: None)
    assert tamper.feed(FIRST[:4]) == b""
    assert tamper.feed(FIRST[4:-1]) == b""
    assert tamper.feed(FIRST[-1:]) == FIRST
