"""The token state in two slots rewritten in place, the anchor likewise (issue 15): a torn
slot falls back to the other, an old copy put back is refused, a crash at each point of a
flush opens the last state whose answers were sent (or the one after it, complete), and a
home written in the format before (one file replaced by rename) opens and is converted."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from plugshare.token import vault
from plugshare.token.inside import OWNER, RollbackError, SoftKeystore, Token, TokenStateError
from plugshare.token.soft_keystore import ANCHOR_FILE, ANCHOR_SLOTS

NOTES = "io.plugshare.notes"
FORMAT1_HOME = Path(__file__).parent / "data" / "format1_home"


def _soft(tmp_path: Path) -> SoftKeystore:
    return SoftKeystore(tmp_path / "ks", None)


def _newest(state_dir: Path) -> vault.Candidate:
    return max((c for c in vault.candidates(state_dir) if c.sealed is not None),
               key=lambda c: c.sealed.counter)


def _segment(state_dir: Path) -> Path:
    return sorted((state_dir / "audit").glob("*.seg"))[-1]


def test_a_torn_slot_falls_back_to_the_other(tmp_path: Path, make_keystore) -> None:
    """A crash in the middle of writing the free slot: that slot fails authentication, the
    other one (the state whose answers were sent) opens, with either keystore."""
    token, _ = Token.create(tmp_path / "state", make_keystore(), name="n")
    token.add_app("kept", NOTES, "read")
    token.flush()
    version = token.info().state_version
    free = token._slots.path(token._slots.next)
    token.close()
    blob = bytearray(free.read_bytes())
    half = _newest(tmp_path / "state").sealed
    torn_at = len(half.aad) + len(half.ciphertext) // 2
    blob[:torn_at] = os.urandom(torn_at)  # the new bytes reached only part of the slot
    free.write_bytes(bytes(blob))

    token = Token.open(tmp_path / "state", make_keystore())
    assert token.info().state_version == version
    assert [a.name for a in token.list_apps()] == ["kept"]
    assert token.audit_verify()[0]
    token.add_app("after", NOTES, "read")  # the next flush rewrites the torn slot
    token.close()
    token = Token.open(tmp_path / "state", make_keystore())
    assert sorted(a.name for a in token.list_apps()) == ["after", "kept"]
    token.close()


@pytest.mark.parametrize("put_back", ["the newest slot", "both slots"])
def test_an_old_copy_of_a_slot_put_back_is_refused(
    tmp_path: Path, make_keystore, put_back: str
) -> None:
    token, _ = Token.create(tmp_path / "state", make_keystore(), name="n")
    token.add_app("first", NOTES, "read")
    token.flush()  # both slots hold a state from here on
    snapshot = {name: (tmp_path / "state" / name).read_bytes()
                for name in vault.SLOT_FILES if (tmp_path / "state" / name).exists()}
    for i in range(3):  # the attacker wants these undone
        token.add_app(f"later{i}", NOTES, "read")
        token.flush()
    newest = token._slots.path(token._slots.current)
    token.close()
    if put_back == "the newest slot":
        old = vault.candidates(tmp_path / "state")
        newest.write_bytes(snapshot[newest.name])
        assert max(c.sealed.counter for c in vault.candidates(tmp_path / "state")) < max(
            c.sealed.counter for c in old)
    else:
        for name, data in snapshot.items():
            (tmp_path / "state" / name).write_bytes(data)
    with pytest.raises(RollbackError, match="older copy"):
        Token.open(tmp_path / "state", make_keystore())


# What the files hold at each point where a crash can stop a flush of version c+1 (the
# current state c in one slot): the free slot, the audit segment, the anchor file, each
# as before the flush, after it, or torn half way; and the version that must open.
CRASH_POINTS = {
    "before any write": (("before", "before", "before"), "old"),
    "audit record durable only": (("before", "after", "before"), "old"),
    "slot torn, audit durable": (("torn", "after", "before"), "old"),
    "slot torn, audit not yet": (("torn", "before", "before"), "old"),
    "slot durable, audit not yet": (("after", "before", "before"), "old"),
    "slot and audit durable, anchor not yet": (("after", "after", "before"), "new"),
    "anchor torn": (("after", "after", "torn"), "new"),
    "everything durable": (("after", "after", "after"), "new"),
}


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_a_crash_at_each_point_of_a_flush(tmp_path: Path, point: str) -> None:
    state_dir = tmp_path / "state"
    token, _ = Token.create(state_dir, _soft(tmp_path), name="n")
    token.add_app("old", NOTES, "read")
    token.decide(OWNER, "read", {"doctype": NOTES, "_id": "a"})
    token.flush()
    old_version = token.info().state_version
    free = token._slots.path(token._slots.next)
    files = [free, _segment(state_dir), tmp_path / "ks" / ANCHOR_FILE]
    before = [p.read_bytes() if p.exists() else b"" for p in files]
    token.add_app("new", NOTES, "read")
    token.decide(OWNER, "read", {"doctype": NOTES, "_id": "b"})
    token.flush()
    after = [p.read_bytes() for p in files]
    token.close()

    def torn(old: bytes, new: bytes, path: Path) -> bytes:
        if path.name == ANCHOR_FILE:  # the slot that changed, half old, half new
            slot = next(o for o in ANCHOR_SLOTS if old[o:o + 36] != new[o:o + 36])
            return new[:slot + 18] + old[slot + 18:]
        sealed = vault.parse(new, path)  # the slot: half of its sealed bytes new
        cut = (len(sealed.aad) + len(sealed.ciphertext)) // 2
        return new[:cut] + old[cut:]

    shapes, expect = CRASH_POINTS[point]
    for path, shape, old, new in zip(files, shapes, before, after):
        path.write_bytes({"before": old, "after": new}.get(shape) or torn(old, new, path))

    token = Token.open(state_dir, _soft(tmp_path))
    apps = {a.name for a in token.list_apps()}
    if expect == "old":
        assert token.info().state_version == old_version
        assert apps == {"old"}
    else:
        assert token.info().state_version == old_version + 1
        assert apps == {"old", "new"}
    assert token._keystore.read_anchor() == token.info().state_version
    assert token.audit_verify()[0]
    token.add_app("next", NOTES, "read")  # and it goes on from there
    version = token.info().state_version
    token.close()
    token = Token.open(state_dir, _soft(tmp_path))
    assert token.info().state_version == version + 1
    assert token.audit_verify()[0]
    token.close()


def test_a_state_at_the_anchor_whose_audit_was_cut_is_refused(tmp_path: Path) -> None:
    """The fallback to the other slot is only for a state newer than the anchor: the log of
    a state whose answers were sent cannot be cut by cutting it and hoping for a fallback."""
    state_dir = tmp_path / "state"
    token, _ = Token.create(state_dir, _soft(tmp_path), name="n")
    token.decide(OWNER, "read", {"doctype": NOTES})
    token.flush()
    size = _segment(state_dir).stat().st_size
    token.decide(OWNER, "read", {"doctype": NOTES})
    token.flush()
    token.close()
    segment = _segment(state_dir)
    segment.write_bytes(segment.read_bytes()[:size])  # the last record cut
    with pytest.raises(TokenStateError, match="truncated"):
        Token.open(state_dir, _soft(tmp_path))


def test_a_home_of_the_format_before_opens_and_is_converted(tmp_path: Path) -> None:
    """`data/format1_home` was written by the code before slots (token.state replaced by
    rename, a one-record anchor file): it opens; its first flush writes a slot and removes
    the old file once the anchor has passed it; it then opens from the slots."""
    home = tmp_path / "home"
    shutil.copytree(FORMAT1_HOME, home)
    credential = (home / "owner.credential").read_text()
    keystore = lambda: SoftKeystore(home / "ks", None)  # noqa: E731
    token = Token.open(home / "state", keystore())
    assert token.authenticate(credential) == OWNER
    assert token.info().state_version == 4
    assert [a.name for a in token.list_apps()] == ["notes-app"]
    assert token.audit_verify() == (True, 5, None)  # the 5 entries written before
    token.add_app("new", NOTES, "read")
    token.flush()
    assert not (home / "state" / vault.LEGACY_STATE_FILE).exists()
    token.close()
    assert (home / "ks" / ANCHOR_FILE).stat().st_size == ANCHOR_SLOTS[-1] + 36
    token = Token.open(home / "state", keystore())
    assert sorted(a.name for a in token.list_apps()) == ["new", "notes-app"]
    assert token.info().state_version == 5
    assert token.audit_verify()[0]
    token.close()


def test_an_old_format_file_left_beside_the_slots_is_never_taken(tmp_path: Path) -> None:
    """A crash between the first slot's flush and the old file's removal leaves both: the
    slot, newer, wins; the old file put back later is only an older copy."""
    home = tmp_path / "home"
    shutil.copytree(FORMAT1_HOME, home)
    legacy = (home / "state" / vault.LEGACY_STATE_FILE).read_bytes()
    token = Token.open(home / "state", SoftKeystore(home / "ks", None))
    token.add_app("new", NOTES, "read")
    token.close()
    (home / "state" / vault.LEGACY_STATE_FILE).write_bytes(legacy)
    token = Token.open(home / "state", SoftKeystore(home / "ks", None))
    assert "new" in {a.name for a in token.list_apps()}
    token.close()
    for name in vault.SLOT_FILES:
        (home / "state" / name).unlink(missing_ok=True)
    with pytest.raises(RollbackError):
        Token.open(home / "state", SoftKeystore(home / "ks", None))
