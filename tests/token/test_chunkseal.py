"""Attachment chunks sealed in the token (`share.seal_chunks`, `share.open_chunks`, on both
keystores): bound to the document, attachment, revpos, index and end of file under the share
or data key; a tampered, reordered, swapped or cut-short chunk is refused and audited; content
addresses keyed per share, revealing nothing of the plaintext."""

from __future__ import annotations

import hashlib

import msgpack
import pytest

from plugshare.store.attachments import CHUNK_SIZE
from plugshare.token import IntegrityError, InvalidArgument
from plugshare.token.chunkseal import CHUNK_SIZE as SEAL_CHUNK_SIZE
from plugshare.token.chunkseal import PLAINTEXT_CHUNK
from plugshare.token.door import MAX_CHUNKS, Door

NOTES = "io.notes"


@pytest.fixture
def door(token_and_owner):
    token, owner = token_and_owner
    return Door(token), owner


def _wire(value):
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)


def seal(d, chunks, *, first=0, last=True, doc_id="d1", name="f.bin", revpos=2, **scope):
    return _wire(d.handle("share.seal_chunks", {**scope, "doc_id": doc_id, "name": name,
                                                "revpos": revpos, "first": first, "last": last,
                                                "chunks": chunks}))


def open_(d, chunks, *, first=0, last=True, doc_id="d1", name="f.bin", revpos=2, **scope):
    return _wire(d.handle("share.open_chunks", {**scope, "doc_id": doc_id, "name": name,
                                                "revpos": revpos, "first": first, "last": last,
                                                "chunks": chunks}))["chunks"]


@pytest.fixture
def encrypted_share(door, token):
    d, _ = door
    return token.create_share("secret", NOTES, encrypted=True).share_id


def refusals(token):
    return [e for e in token.audit_tail(10) if e.action == "attachment-open" and not e.allowed]


def test_a_sealed_full_chunk_is_exactly_one_store_chunk(door, token):
    assert SEAL_CHUNK_SIZE == CHUNK_SIZE
    d, _ = door
    share = token.create_share("s", NOTES, encrypted=True).share_id
    [sealed] = seal(d, [b"p" * PLAINTEXT_CHUNK], share=share)["chunks"]
    assert len(sealed) == CHUNK_SIZE


def test_chunks_sealed_in_an_encrypted_share_open_where_they_stand(door, encrypted_share):
    d, _ = door
    plain = [b"a" * PLAINTEXT_CHUNK, b"b" * 100]
    sealed = seal(d, plain, share=encrypted_share)
    assert all(b"aaaa" not in c and b"bbbb" not in c for c in sealed["chunks"])
    assert open_(d, sealed["chunks"], share=encrypted_share) == plain


@pytest.mark.parametrize("case", ["flipped bit", "reordered", "other doc", "other name",
                                  "other revpos", "cut short", "other share"])
def test_a_tampered_reordered_swapped_or_cut_chunk_is_refused_and_audited(door, token,
                                                                          encrypted_share, case):
    d, _ = door
    other = token.create_share("secret2", "io.other", encrypted=True).share_id
    plain = [b"x" * 1000, b"y" * 1000, b"z" * 10]
    chunks = seal(d, plain, share=encrypted_share)["chunks"]
    where = {"share": encrypted_share}
    if case == "flipped bit":
        chunks[1] = chunks[1][:-5] + bytes([chunks[1][-5] ^ 1]) + chunks[1][-4:]
    elif case == "reordered":
        chunks[0], chunks[1] = chunks[1], chunks[0]
    elif case == "other doc":
        where["doc_id"] = "d2"
    elif case == "other name":
        where["name"] = "g.bin"
    elif case == "other revpos":
        where["revpos"] = 3
    elif case == "cut short":  # the first two alone, passed off as the whole file
        chunks, where["last"] = chunks[:2], True
    elif case == "other share":
        where["share"] = other
    before = len(refusals(token))
    with pytest.raises(IntegrityError):
        open_(d, chunks, **where)
    assert len(refusals(token)) == before + 1


def test_addresses_are_keyed_per_share_and_reveal_nothing(door, token, encrypted_share):
    d, _ = door
    other = token.create_share("secret2", "io.other", encrypted=True).share_id
    data = b"a well-known file" * 100
    mine = seal(d, [data], share=encrypted_share)["addresses"][0]
    again = seal(d, [data], share=encrypted_share, doc_id="elsewhere")["addresses"][0]
    theirs = seal(d, [data], share=other)["addresses"][0]
    assert mine == again  # one share: the same chunk has one address, wherever it is
    assert mine != theirs and mine != hashlib.sha256(data).digest()


def test_a_sensitive_doctype_seals_under_its_data_key(door, token):
    d, owner = door
    d.handle("doctype.encrypt", {"credential": owner, "doctype": "io.health"})
    sealed = seal(d, [b"scan"], doctype="io.health")["chunks"]
    assert open_(d, sealed, doctype="io.health") == [b"scan"]
    with pytest.raises(IntegrityError):
        open_(d, sealed, doctype="io.health", first=1)


def test_plain_scopes_and_bad_arguments_are_refused(door, token):
    d, _ = door
    plain = token.create_share("plain", NOTES).share_id
    with pytest.raises(InvalidArgument, match="not encrypted"):
        seal(d, [b"x"], share=plain)
    with pytest.raises(InvalidArgument, match="exactly one"):
        seal(d, [b"x"])
    with pytest.raises(InvalidArgument):
        seal(d, [b"x" * (PLAINTEXT_CHUNK + 1)], doctype="io.health")
    with pytest.raises(InvalidArgument):
        seal(d, [b"x"] * (MAX_CHUNKS + 1), doctype="io.health")


def test_chunks_are_checked_32_at_a_time_without_their_plaintext_coming_back(door, token,
                                                                          encrypted_share):
    """Issue 13's speed: a node receiving a sealed file only checks its chunks (the plaintext
    was sent back to it and dropped, 8 chunks per command, each with a durable audit entry):
    32 per command now, and nothing but the count comes back."""
    d, _ = door
    plain = [bytes([i]) * PLAINTEXT_CHUNK for i in range(31)] + [b"end"]
    sealed = []
    for start in range(0, len(plain), 8):
        sealed += seal(d, plain[start:start + 8], first=start,
                       last=start + 8 >= len(plain), share=encrypted_share)["chunks"]
    args = {"share": encrypted_share, "doc_id": "d1", "name": "f.bin", "revpos": 2,
            "first": 0, "last": True, "check_only": True}
    assert _wire(d.handle("share.open_chunks", {**args, "chunks": sealed})) == {"checked": 32}
    sealed[30] = sealed[30][:-1] + bytes([sealed[30][-1] ^ 1])
    before = len(refusals(token))
    with pytest.raises(IntegrityError):
        d.handle("share.open_chunks", {**args, "chunks": sealed})
    assert len(refusals(token)) == before + 1
