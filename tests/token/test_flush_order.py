"""`Token.flush` writes the audit record and the state's free slot at once, then the anchor,
each in place (issue 15): what a flush leaves behind when it succeeds and when one of its
writes fails, on real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugshare.token.inside import OWNER, SoftKeystore, Token, TokenStateError
from plugshare.token import vault

NOTES = "io.plugshare.notes"


def _temporaries(*directories: Path) -> list[Path]:
    return [p for d in directories for p in d.rglob("*.tmp")]


def test_a_flush_leaves_state_anchor_and_audit_in_step(tmp_path: Path) -> None:
    keystore = lambda: SoftKeystore(tmp_path / "ks", None)  # noqa: E731
    token, _ = Token.create(tmp_path / "state", keystore(), name="n")
    for i in range(5):
        token.add_app(f"app{i}", NOTES, "read")
        token.decide(OWNER, "read", {"doctype": NOTES})
        token.flush()
        assert token._keystore.read_anchor() == token.info().state_version
    assert _temporaries(tmp_path / "state", tmp_path / "ks") == []
    version, entries = token.info().state_version, token.info().audit_entries
    token.close()
    token = Token.open(tmp_path / "state", keystore())
    assert token.info().state_version == version
    assert token.info().audit_entries == entries
    assert [a.name for a in token.list_apps()] == [f"app{i}" for i in range(5)]
    token.close()


def test_a_failed_audit_append_commits_no_state_and_no_anchor(tmp_path: Path) -> None:
    token, _ = Token.create(tmp_path / "state", SoftKeystore(tmp_path / "ks", None), name="n")
    token.decide(OWNER, "read", {"doctype": NOTES})
    token.flush()
    current = token._slots.path(token._slots.current)
    anchor_before = token._keystore.read_anchor()
    segment = sorted((tmp_path / "state" / "audit").glob("*.seg"))[-1]
    segment.write_bytes(segment.read_bytes()[:-1])  # cut below what the state records

    token.decide(OWNER, "read", {"doctype": NOTES})
    with pytest.raises(TokenStateError, match="truncated"):
        token.flush()
    assert token._keystore.read_anchor() == anchor_before
    assert _temporaries(tmp_path / "state", tmp_path / "ks") == []
    # the state written beside the failed append is in the free slot, never over the
    # current one; the anchor did not follow it, so it is not what opens
    assert [c.sealed.counter for c in vault.candidates(tmp_path / "state")
            if c.path == current] == [anchor_before]
