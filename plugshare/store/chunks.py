"""Attachment data in the embedded store: content-addressed chunks in SQLite tables.

A *content* is one attachment's data: its length, its md5 digest and the list of its chunks,
each `CHUNK_SIZE` bytes (the last one shorter). A *chunk* is stored once, keyed by the
SHA-256 of its bytes, however many contents (of however many documents and revisions) hold
it. Documents reference contents from their leaf bodies (`_attachments[name]["content"]`);
`doc_contents` lists which contents each document's leaves reference, so a content no leaf
references anymore is found without reading any document.

Garbage collection:
- on the write that drops a document's last leaf reference to a content, in the same
  transaction (`set_doc_contents` returns what a doc dropped, `collect` removes those no
  other document references, then their chunks no other content holds);
- on `compact` (`sweep`): every content no document references (an upload that was cut with
  the process killed before it could clean up after itself, or one being read when its last
  reference went), and the chunks only they held.
Contents being written or read (`in_use`) are never collected.

Staged chunks: a replicated attachment arrives a chunk at a time, possibly over several
connections (a transfer cut by a crash resumes). Each chunk received is stored at once and
marked in `staged_chunks` (as is a chunk already held that the transfer will reuse), so it
survives a restart and is never collected (by `collect` or `sweep`) until the transfer that
needs it releases it (`unstage`), once its revision is written or abandoned, or until no
transfer has staged or claimed it for the resume window (`expire_staged`: a transfer cut for
good, whose node was killed and which never came back).

Where a chunk's bytes are: in an append-only pack file beside the store (`pack`,
`pack_offset`, `pack_size`, and an empty `data`; see `packs.py`), written once and synced
before the row commits; or in its row (`data`: chunks uploaded by earlier versions, which
wrote every byte twice, to the WAL then to the database). Every reader takes either.

Every function runs inside the caller's transaction, on the store's worker thread.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Collection, Container, Iterable

from plugshare.store.attachments import CHUNK_SIZE
from plugshare.store.packs import REPACK_BELOW, ChunkPacks

SCHEMA = """
CREATE TABLE chunks (
    id      INTEGER PRIMARY KEY,
    hash    BLOB NOT NULL UNIQUE,     -- SHA-256 of data
    data    BLOB NOT NULL
);
CREATE TABLE contents (
    id          INTEGER PRIMARY KEY,
    length      INTEGER,              -- NULL while its upload is under way
    digest      TEXT,                 -- "md5-<base64>", NULL while under way
    chunk_size  INTEGER NOT NULL
);
CREATE TABLE content_chunks (
    content INTEGER NOT NULL,
    idx     INTEGER NOT NULL,         -- the chunk's position in the content
    chunk   INTEGER NOT NULL,
    PRIMARY KEY (content, idx)
) WITHOUT ROWID;
CREATE INDEX content_chunks_by_chunk ON content_chunks (chunk);
CREATE TABLE doc_contents (
    doc     TEXT NOT NULL,
    content INTEGER NOT NULL,
    PRIMARY KEY (doc, content)
) WITHOUT ROWID;
CREATE INDEX doc_contents_by_content ON doc_contents (content);
"""

STAGING_SCHEMA = """
CREATE TABLE IF NOT EXISTS staged_chunks (
    chunk       INTEGER PRIMARY KEY,     -- a chunk an incoming transfer holds on to
    staged_at   REAL                     -- when a transfer last staged or claimed it (Unix time)
)
"""


def create_tables(conn: sqlite3.Connection, now: float) -> None:
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    create_staging(conn, now)


def create_staging(conn: sqlite3.Connection, now: float) -> None:
    """The staging table (added after schema version 2: created when missing; its
    `staged_at`, added later, set to `now` for chunks staged before), and the columns of
    chunks kept in packs (schema version 3: added when missing)."""
    conn.execute(STAGING_SCHEMA)
    if "staged_at" not in {row[1] for row in conn.execute("PRAGMA table_info(staged_chunks)")}:
        conn.execute("ALTER TABLE staged_chunks ADD COLUMN staged_at REAL")
        conn.execute("UPDATE staged_chunks SET staged_at = ?", (now,))
    columns = {row[1] for row in conn.execute("PRAGMA table_info(chunks)")}
    if "pack" not in columns:
        for column in ("pack", "pack_offset", "pack_size"):
            conn.execute(f"ALTER TABLE chunks ADD COLUMN {column} INTEGER")
    conn.execute("CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks (pack) WHERE pack IS NOT NULL")


def _data(packs: ChunkPacks, row: tuple) -> bytes:
    """A chunk's bytes from its `(data, pack, pack_offset, pack_size)`."""
    data, pack, offset, size = row
    return data if pack is None else packs.read(pack, offset, size)


def _dropped(packs: ChunkPacks, rows: Iterable[tuple]) -> None:
    """Rows of chunks just deleted (`RETURNING pack`): their packs may be empty now."""
    packs.released.update(row[0] for row in rows if row[0] is not None)


_MARK = ("INSERT INTO staged_chunks (chunk, staged_at) VALUES (?, ?) "
         "ON CONFLICT (chunk) DO UPDATE SET staged_at = excluded.staged_at")


def claim_chunks(conn: sqlite3.Connection, hashes: Iterable[bytes], now: float) -> set[bytes]:
    """Mark every chunk of `hashes` that is stored as staged at `now`; return those stored."""
    held = set()
    for digest in dict.fromkeys(hashes):
        row = conn.execute("SELECT id FROM chunks WHERE hash = ?", (digest,)).fetchone()
        if row is not None:
            conn.execute(_MARK, (row[0], now))
            held.add(digest)
    return held


def stage_chunks(conn: sqlite3.Connection, packs: ChunkPacks, pieces: list[bytes],
                 now: float, checked: list[bytes] | None = None) -> list[bytes]:
    """Store `pieces` as staged chunks at `now` (each once, however often it is staged), their
    bytes appended to the current pack; their SHA-256s (`checked`: as the caller computed
    them, taken as they are)."""
    digests = []
    for position, data in enumerate(pieces):
        digest = hashlib.sha256(data).digest() if checked is None else checked[position]
        conn.execute(_MARK, (_store_chunk(conn, packs, digest, data), now))
        digests.append(digest)
    return digests


def _store_chunk(conn: sqlite3.Connection, packs: ChunkPacks, digest: bytes, data: bytes) -> int:
    """The id of the chunk `digest`; stored first if it is not (its bytes appended to the
    current pack: written once, synced before the rows commit, not into the database)."""
    row = conn.execute("SELECT id FROM chunks WHERE hash = ?", (digest,)).fetchone()
    if row is None:
        pack, offset = packs.append(data)
        row = conn.execute(
            "INSERT INTO chunks (hash, data, pack, pack_offset, pack_size) "
            "VALUES (?, x'', ?, ?, ?) RETURNING id",
            (digest, pack, offset, len(data)),
        ).fetchone()
    return row[0]


def read_staged(conn: sqlite3.Connection, packs: ChunkPacks, digest: bytes) -> bytes | None:
    row = conn.execute(
        "SELECT data, pack, pack_offset, pack_size FROM chunks "
        "JOIN staged_chunks ON staged_chunks.chunk = chunks.id WHERE hash = ?", (digest,)
    ).fetchone()
    return None if row is None else _data(packs, row)


def staged_size(conn: sqlite3.Connection, digest: bytes) -> int | None:
    """The size of a staged chunk, its data unread; None if it is not staged."""
    row = conn.execute(
        "SELECT coalesce(pack_size, length(data)) FROM chunks "
        "JOIN staged_chunks ON staged_chunks.chunk = chunks.id WHERE hash = ?", (digest,)
    ).fetchone()
    return None if row is None else row[0]


def unstage(conn: sqlite3.Connection, packs: ChunkPacks, hashes: Iterable[bytes]) -> None:
    """Release staged chunks; those no content holds are removed."""
    for digest in hashes:
        row = conn.execute("SELECT id FROM chunks WHERE hash = ?", (digest,)).fetchone()
        if row is not None:
            _unstage_chunk(conn, packs, row[0])


def expire_staged(conn: sqlite3.Connection, packs: ChunkPacks, before: float,
                  held: Container[bytes]) -> int:
    """Unstage every chunk last staged or claimed before `before` (a transfer cut for good)
    but those in `held` (a transfer of this process holds them); those no content holds
    are removed. How many were removed."""
    expired = [chunk for chunk, digest in conn.execute(
        "SELECT chunk, hash FROM staged_chunks JOIN chunks ON chunks.id = staged_chunks.chunk "
        "WHERE staged_at < ?", (before,)
    ).fetchall() if digest not in held]
    return sum(_unstage_chunk(conn, packs, chunk) for chunk in expired)


def _unstage_chunk(conn: sqlite3.Connection, packs: ChunkPacks, chunk: int) -> bool:
    """Drop chunk `chunk`'s staged mark, and the chunk if no content holds it (whether it
    went)."""
    conn.execute("DELETE FROM staged_chunks WHERE chunk = ?", (chunk,))
    rows = conn.execute(
        "DELETE FROM chunks WHERE id = ?1 AND NOT EXISTS "
        "(SELECT 1 FROM content_chunks WHERE chunk = ?1) RETURNING pack", (chunk,)
    ).fetchall()
    _dropped(packs, rows)
    return bool(rows)


def new_content(conn: sqlite3.Connection) -> int:
    """A content to upload into (unfinished: no length or digest yet)."""
    return conn.execute(
        "INSERT INTO contents (chunk_size) VALUES (?) RETURNING id", (CHUNK_SIZE,)
    ).fetchone()[0]


def add_chunks(conn: sqlite3.Connection, packs: ChunkPacks, content: int, first: int,
               pieces: list[bytes]) -> None:
    """Append `pieces` to `content` as its chunks `first`, `first + 1`...; a chunk already
    stored (by any content) is referenced, not stored again."""
    for index, piece in enumerate(pieces, first):
        chunk = _store_chunk(conn, packs, hashlib.sha256(piece).digest(), piece)
        conn.execute("INSERT INTO content_chunks (content, idx, chunk) VALUES (?, ?, ?)",
                     (content, index, chunk))


def link_chunks(conn: sqlite3.Connection, content: int, first: int, hashes: list[bytes]) -> None:
    """Make the stored chunks `hashes` chunks `first`, `first + 1`... of `content`."""
    for index, digest in enumerate(hashes, first):
        linked = conn.execute(
            "INSERT INTO content_chunks (content, idx, chunk) "
            "SELECT ?, ?, id FROM chunks WHERE hash = ?",
            (content, index, digest),
        ).rowcount
        if linked != 1:
            raise sqlite3.IntegrityError(f"chunk {digest.hex()} is not stored")


def finish_content(conn: sqlite3.Connection, content: int, length: int, digest: str) -> None:
    conn.execute(
        "UPDATE contents SET length = ?, digest = ? WHERE id = ?", (length, digest, content)
    )


def content_exists(conn: sqlite3.Connection, content: int) -> bool:
    row = conn.execute("SELECT 1 FROM contents WHERE id = ?", (content,)).fetchone()
    return row is not None


def chunk_size_of(conn: sqlite3.Connection, content: int) -> int | None:
    row = conn.execute("SELECT chunk_size FROM contents WHERE id = ?", (content,)).fetchone()
    return None if row is None else row[0]


def chunk_hashes(conn: sqlite3.Connection, content: int) -> list[bytes]:
    """The SHA-256 of each chunk of `content`, in order."""
    return [row[0] for row in conn.execute(
        "SELECT hash FROM content_chunks JOIN chunks ON chunks.id = content_chunks.chunk "
        "WHERE content = ? ORDER BY idx", (content,)
    )]


def read_chunk(conn: sqlite3.Connection, packs: ChunkPacks, content: int, index: int) -> bytes | None:
    row = conn.execute(
        "SELECT data, pack, pack_offset, pack_size FROM content_chunks "
        "JOIN chunks ON chunks.id = content_chunks.chunk WHERE content = ? AND idx = ?",
        (content, index),
    ).fetchone()
    return None if row is None else _data(packs, row)


def set_doc_contents(conn: sqlite3.Connection, doc_id: str, contents: set[int]) -> set[int]:
    """Record the contents `doc_id`'s leaves reference; return those it referenced before
    and no longer does."""
    before = {row[0] for row in conn.execute(
        "SELECT content FROM doc_contents WHERE doc = ?", (doc_id,)
    )}
    dropped = before - contents
    conn.executemany(
        "DELETE FROM doc_contents WHERE doc = ? AND content = ?",
        ((doc_id, content) for content in dropped),
    )
    conn.executemany(
        "INSERT INTO doc_contents (doc, content) VALUES (?, ?)",
        ((doc_id, content) for content in contents - before),
    )
    return dropped


def collect(conn: sqlite3.Connection, packs: ChunkPacks, candidates: Iterable[int],
            in_use: Collection[int]) -> int:
    """Remove the candidate contents no document references and nobody is using, and the
    chunks no other content holds; return how many contents went."""
    removed = 0
    for content in candidates:
        if content in in_use:
            continue
        referenced = conn.execute(
            "SELECT 1 FROM doc_contents WHERE content = ? LIMIT 1", (content,)
        ).fetchone()
        if referenced is not None:
            continue
        chunk_ids = [row[0] for row in conn.execute(
            "SELECT DISTINCT chunk FROM content_chunks WHERE content = ?", (content,)
        )]
        conn.execute("DELETE FROM content_chunks WHERE content = ?", (content,))
        conn.execute("DELETE FROM contents WHERE id = ?", (content,))
        for chunk in chunk_ids:
            _dropped(packs, conn.execute(
                "DELETE FROM chunks WHERE id = ?1 AND NOT EXISTS "
                "(SELECT 1 FROM content_chunks WHERE chunk = ?1) AND NOT EXISTS "
                "(SELECT 1 FROM staged_chunks WHERE chunk = ?1) RETURNING pack", (chunk,)
            ).fetchall())
        removed += 1
    return removed


def sweep(conn: sqlite3.Connection, packs: ChunkPacks, in_use: Collection[int]) -> int:
    """`collect` every content no document references (compaction)."""
    orphans = [row[0] for row in conn.execute(
        "SELECT id FROM contents WHERE NOT EXISTS "
        "(SELECT 1 FROM doc_contents WHERE content = contents.id)"
    )]
    return collect(conn, packs, orphans, in_use)


def usage(conn: sqlite3.Connection) -> dict[str, int]:
    """How much attachment data is stored: distinct chunks, their bytes, contents."""
    chunks, size = conn.execute(
        "SELECT count(*), coalesce(sum(coalesce(pack_size, length(data))), 0) FROM chunks"
    ).fetchone()
    (contents,) = conn.execute("SELECT count(*) FROM contents").fetchone()
    return {"attachment_chunks": chunks, "attachment_bytes": size,
            "attachment_contents": contents}


def repack(conn: sqlite3.Connection, packs: ChunkPacks) -> int:
    """Move the live chunks of one pack that is mostly dead space (`REPACK_BELOW`) into the
    current pack, in the caller's transaction; the old pack, named by no row once it
    commits, goes at `reclaim`. Returns the bytes given back (0: no such pack)."""
    live = dict(conn.execute(
        "SELECT pack, SUM(pack_size) FROM chunks WHERE pack IS NOT NULL GROUP BY pack"))
    for pack, size in sorted(packs.closed_sizes().items()):
        kept = live.get(pack, 0)
        if not kept or kept >= size * REPACK_BELOW:
            continue  # no row: `reclaim_all` removes it; mostly live: left as it is
        rows = conn.execute(
            "SELECT id, pack_offset, pack_size FROM chunks WHERE pack = ?", (pack,)).fetchall()
        for chunk, offset, length in rows:
            moved, at = packs.append(packs.read(pack, offset, length))
            conn.execute("UPDATE chunks SET pack = ?, pack_offset = ? WHERE id = ?",
                         (moved, at, chunk))
        packs.released.add(pack)
        return size - kept
    return 0
