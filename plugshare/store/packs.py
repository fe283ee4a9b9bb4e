"""Append-only pack files for the embedded store's staged chunk data.

A chunk that arrives from a peer is appended to the current pack (`<store>-chunks/pack-N`);
its row in `chunks` records where (pack, offset, size). The bytes are written once, and made
durable by one fsync of the pack before the transaction that records them commits (the
store's group commit calls `sync`), instead of twice through SQLite (its WAL, then the
database file, each synced). Chunks uploaded through the API stay in SQLite rows: a chunk is
read from wherever its row says.

Crash safety: a row never names bytes that were not synced first; bytes appended by a
transaction that did not commit are dead space. A store opens a new pack (the previous one's
tail may be torn), and a pack no row names anymore (all its chunks released or collected) is
removed after the commit that dropped its last row (`reclaim`) or when the store opens or
compacts (`reclaim_all`). A pack whose live chunks fill less than `REPACK_BELOW` of it has
them moved into the current pack (`chunks.repack`, the store's `reclaim_space`): their rows
then name the new place, and the old pack goes at the next `reclaim`. Dead space in the
current pack waits until it is no longer current.

Used from the store's worker thread only (one at a time), inside its transactions.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from plugshare.store.base import StoreError

PACK_SIZE = 64 * 1024 * 1024  # bytes appended to a pack before the next one is started
MAX_OPEN_READERS = 16  # read descriptors kept open (least recently opened closed first)
REPACK_BELOW = 0.5  # a pack whose live chunks fill less than this share of it is rewritten
_PREFIX = "pack-"


def _pack_number(path: Path) -> int | None:
    digits = path.name[len(_PREFIX):]
    return int(digits) if path.name.startswith(_PREFIX) and digits.isdigit() else None


class ChunkPacks:
    """The pack files beside one store file."""

    def __init__(self, store_path: Path) -> None:
        self.directory = store_path.with_name(store_path.name + "-chunks")
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.directory, 0o700)  # one made loose beforehand (umask, by hand)
            numbers = [n for p in self.directory.iterdir() if (n := _pack_number(p)) is not None]
        except OSError as exc:
            raise StoreError(f"cannot open the chunk packs in {self.directory}: {exc}") from exc
        self._current = max(numbers, default=0)  # the next append starts a pack after it
        self._writer: int | None = None
        self._written = 0
        self._unsynced = False
        self._broken = False  # a write failed: this transaction's appends cannot be trusted
        self._readers: dict[int, int] = {}
        self.released: set[int] = set()  # packs that lost rows in this transaction

    def _path(self, pack: int) -> Path:
        return self.directory / f"{_PREFIX}{pack:08d}"

    def append(self, data: bytes) -> tuple[int, int]:
        """Append `data` to the current pack: `(pack, offset)`. Durable after `sync`."""
        try:
            if self._writer is None or self._written >= PACK_SIZE:
                self._start_pack()
            view, offset = memoryview(data), self._written
            while view:
                view = view[os.write(self._writer, view):]
        except OSError as exc:
            self._drop_writer()
            self._broken = True
            raise StoreError(f"cannot write chunk data to {self.directory}: {exc}") from exc
        self._written += len(data)
        self._unsynced = True
        return self._current, offset

    def _start_pack(self) -> None:
        if self._writer is not None:
            self.sync()  # what this transaction appended to it so far
            os.close(self._writer)
            self._writer = None
        self._current += 1
        self._writer = os.open(self._path(self._current),
                               os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                               0o600)
        self._written = 0
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)  # the new pack's name is durable with its first bytes
        finally:
            os.close(directory)

    def sync(self) -> None:
        """Make every append so far durable (before the transaction naming them commits)."""
        if self._broken:
            self._broken = False
            raise StoreError(f"a write to the chunk packs in {self.directory} failed")
        if not self._unsynced or self._writer is None:
            return
        try:
            os.fsync(self._writer)
        except OSError as exc:
            # After a failed fsync the kernel may have dropped the pages: never append to,
            # nor trust, that pack again (the rows naming it are rolled back).
            self._drop_writer()
            raise StoreError(f"cannot sync chunk data in {self.directory}: {exc}") from exc
        self._unsynced = False

    def _drop_writer(self) -> None:
        if self._writer is not None:
            os.close(self._writer)
        self._writer, self._unsynced = None, False

    def read(self, pack: int, offset: int, size: int) -> bytes:
        try:
            reader = self._readers.get(pack)
            if reader is None:
                if len(self._readers) >= MAX_OPEN_READERS:
                    os.close(self._readers.pop(next(iter(self._readers))))
                reader = self._readers[pack] = os.open(self._path(pack), os.O_RDONLY | os.O_CLOEXEC)
            data = os.pread(reader, size, offset)
        except OSError as exc:
            raise StoreError(f"cannot read chunk data from pack {pack} in {self.directory}: "
                             f"{exc}") from exc
        if len(data) != size:
            raise StoreError(f"pack {pack} in {self.directory} is missing chunk data "
                             f"(offset {offset}, {size} bytes)")
        return data

    def closed_sizes(self) -> dict[int, int]:
        """The size of each pack no longer appended to, by number."""
        sizes = {}
        for path in self.directory.iterdir():
            pack = _pack_number(path)
            if pack is None or (pack == self._current and self._writer is not None):
                continue
            try:
                sizes[pack] = path.stat().st_size
            except OSError:
                continue  # removed meanwhile
        return sizes

    def reclaim(self, conn: sqlite3.Connection) -> None:
        """After a commit: remove the packs that lost their last row (not the current one)."""
        released, self.released = self.released, set()
        for pack in released:
            self._remove_if_unused(conn, pack)

    def reclaim_all(self, conn: sqlite3.Connection) -> None:
        """Remove every pack no row names (left by a crash, or by a release before it)."""
        self.released.clear()
        for path in self.directory.iterdir():
            if (pack := _pack_number(path)) is not None:
                self._remove_if_unused(conn, pack)

    def _remove_if_unused(self, conn: sqlite3.Connection, pack: int) -> None:
        if pack == self._current and self._writer is not None:
            return
        if conn.execute("SELECT 1 FROM chunks WHERE pack = ? LIMIT 1", (pack,)).fetchone():
            return
        reader = self._readers.pop(pack, None)
        if reader is not None:
            os.close(reader)
        try:
            self._path(pack).unlink(missing_ok=True)
        except OSError:
            pass  # left for the next reclaim_all

    def close(self) -> None:
        self._drop_writer()
        for reader in self._readers.values():
            os.close(reader)
        self._readers.clear()
