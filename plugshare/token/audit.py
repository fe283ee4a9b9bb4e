"""The token's decision log: hash-chained, sealed, append-only, in bounded memory.

Every entry carries `hash = SHA-256(previous hash || entry)`, starting from a genesis hash
bound to the node's fingerprint, so an exported tail can be checked and any edit, removal or
reordering shows. On disk the log is a series of segment files (`audit/00000001.seg`...),
each a run of records `u32 length | nonce | AES-GCM(entries)` whose associated data binds
the segment number and the first sequence number of the record. The token state records,
for each segment, its length, entry count and last hash; since that state is itself sealed
and rollback-checked, truncating or swapping a segment is detected.

`record()` is the hot path (called by every decision): it appends a tuple, nothing more.
Hashing and sealing happen in `stage()`, called by the token's flush.

Refusals of a caller the token could not identify (principal "anonymous": a bad or unknown
credential, a malformed peer claim), and refused authentications of any credential (an
expired share link), are counted rather than logged one by one, since anyone
who can reach the node can send them as fast as it answers: in each `REFUSAL_WINDOW` the first
refusal of a kind (principal, action, doctype, doc id, reason) is logged at once, the others
only counted, and their count is logged as one entry (`count` > 1) when the window closes: at
the first flush after it, when the log is read, or when the token closes. A flood thus costs
at most two entries per kind per window and no flush of its own. Every decision about an
identified caller stays one entry each.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import TokenStateError
from .files import datasync, fsync_dir

SEGMENT_MAX_BYTES = 1 << 20  # start a new segment file past 1 MiB
MAX_UNFLUSHED = 16384  # the token flushes by itself past this many unflushed entries
REFUSAL_WINDOW = 60.0  # seconds over which refusals of unidentified callers are counted
MAX_REFUSAL_KINDS = 64  # kinds counted at once; any further kind is counted as "other"
UNIDENTIFIED = "anonymous"
# A refused authentication is counted like an unidentified caller's refusal even when the
# credential names who it was (an expired or unlinked share link): whoever holds that old
# secret can send it as fast as the node answers.
REFUSED_AUTH = "authenticate"
_clock = time.monotonic  # the windows' clock (wall time may jump)
_NONCE = 12
_LEN = struct.Struct(">I")
_RECORD_AD = struct.Struct(">IQ")
_GENESIS_DOMAIN = b"plugshare/audit/genesis/v1\x00"
_RECORD_DOMAIN = b"plugshare/audit/record/v1\x00"


@attrs.frozen(slots=True)
class AuditEntry:
    """One logged decision or refusal, or `count` alike refusals of unidentified callers."""

    seq: int
    time: float  # Unix time
    principal: str  # "app:notes", "peer:<node id>", "owner:owner", "anonymous"...
    action: str  # read, write, list, authenticate, peer-auth, add_rule...
    doctype: str | None
    doc_id: str | None
    allowed: bool
    reason: str
    hash: bytes
    count: int = 1

    def fields(self) -> list:
        """What the chain hashes (the count only where it is not 1, as it is stored)."""
        fields = [self.seq, self.time, self.principal, self.action, self.doctype, self.doc_id,
                  self.allowed, self.reason]
        return fields if self.count == 1 else [*fields, self.count]


@attrs.frozen
class SegmentRef:
    """What the sealed state knows about one segment file."""

    index: int
    first_seq: int
    entries: int
    length: int  # bytes of complete records
    last_hash: bytes


@attrs.frozen
class AuditMeta:
    """The log's committed position, kept in the sealed token state. After a prune, the
    chain is verifiable from `base_seq`, whose predecessor's hash is `base_hash` (empty:
    from the genesis, nothing pruned)."""

    next_seq: int
    head: bytes
    segments: tuple[SegmentRef, ...]
    base_seq: int = 0
    base_hash: bytes = b""


@attrs.frozen
class StagedAppend:
    """A record to append (`AuditLog.write`), not yet referenced by a committed state."""

    meta: AuditMeta
    count: int
    path: Path
    old_length: int
    record: bytes
    new_segment: bool


def genesis_hash(fingerprint: bytes) -> bytes:
    return hashlib.sha256(_GENESIS_DOMAIN + fingerprint).digest()


def new_meta(fingerprint: bytes) -> AuditMeta:
    return AuditMeta(0, genesis_hash(fingerprint), ())


def chain_hash(previous: bytes, fields: list) -> bytes:
    return hashlib.sha256(previous + msgpack.packb(fields, use_bin_type=True)).digest()


# A stored row is [seq, time, principal, action, doctype, doc_id, allowed, reason, hash], with
# the count appended when it is over 1 (and hashed with the fields before it).
def _hashed_fields(row: list) -> list:
    return row[:8] if len(row) == 9 else [*row[:8], row[9]]


def _valid_row(row: object) -> bool:
    return isinstance(row, list) and (len(row) == 9 or (
        len(row) == 10 and type(row[9]) is int and row[9] > 1))


@attrs.define
class _Tally:
    """Refusals of one kind counted in the current window, after its first (logged)."""

    opened: float  # `_clock()` when the window began
    count: int = 0
    first: float = 0.0  # wall time of the first one counted
    last: float = 0.0


class _Damaged(Exception):
    def __init__(self, first_seq: int, why: str):
        super().__init__(why)
        self.first_seq = first_seq
        self.why = why


class AuditLog:
    """The log of one token: committed segments on disk plus unflushed entries in memory."""

    def __init__(self, directory: Path, aead: AESGCM, meta: AuditMeta, genesis: bytes):
        self._dir = directory
        self._aead = aead
        self._genesis = genesis
        self.meta = meta
        # (time, principal, action, doctype, doc_id, allowed, reason, count)
        self._pending: list[tuple] = []
        self._tallies: dict[tuple, _Tally] = {}  # kind -> refusals counted in its window
        # hashed rows [seq, time, principal, action, doctype, doc_id, allowed, reason, hash],
        # not yet on disk (rows, not AuditEntry objects: this runs for every decision)
        self._chained: list[list] = []
        self._head = meta.head
        self._next_seq = meta.next_seq

    # --- hot path --------------------------------------------------------------------------

    def record(
        self,
        principal: str,
        action: str,
        doctype: str | None,
        doc_id: str | None,
        allowed: bool,
        reason: str,
    ) -> int:
        """Append one entry (or count it, see the module's doc); returns how many entries
        are waiting for a flush."""
        pending = self._pending
        if not allowed and (principal == UNIDENTIFIED or action == REFUSED_AUTH):
            kind = (principal, action, doctype, doc_id, reason)
            if self._count_refusal(kind):
                return len(pending) + len(self._chained)
        pending.append((time.time(), principal, action, doctype, doc_id, allowed, reason, 1))
        return len(pending) + len(self._chained)

    def _count_refusal(self, kind: tuple) -> bool:
        """Count a refusal in its kind's open window: True when counted, False when it is
        the first of a new window (then logged as usual)."""
        now = _clock()
        tally = self._tallies.get(kind)
        if tally is None and len(self._tallies) >= MAX_REFUSAL_KINDS:
            # Kinds are few by construction; should they not be, memory stays bounded.
            kind = (kind[0], kind[1], None, None, "refusals of other kinds")
            tally = self._tallies.get(kind)
        if tally is not None and now - tally.opened >= REFUSAL_WINDOW:
            self._close_window(kind)
            tally = None
        if tally is None:
            self._tallies[kind] = _Tally(now)
            return False
        wall = time.time()
        if not tally.count:
            tally.first = wall
        tally.count += 1
        tally.last = wall
        return True

    def _close_window(self, kind: tuple) -> None:
        tally = self._tallies.pop(kind)
        if tally.count:
            principal, action, doctype, doc_id, reason = kind
            span = tally.last - tally.first
            summary = f"{reason} ({tally.count} more refused alike over {span:.0f} s)"
            self._pending.append(
                (tally.last, principal, action, doctype, doc_id, False, summary, tally.count))

    def close_windows(self, *, all_of_them: bool = True) -> None:
        """Log the counts of the refusal windows (all, or those whose time is up)."""
        now = _clock()
        for kind in [kind for kind, tally in self._tallies.items()
                     if all_of_them or now - tally.opened >= REFUSAL_WINDOW]:
            self._close_window(kind)

    def _windows_due(self) -> int:
        """Open windows whose time is up and that have a count to log."""
        now = _clock()
        return sum(1 for tally in self._tallies.values()
                   if tally.count and now - tally.opened >= REFUSAL_WINDOW)

    @property
    def unflushed(self) -> int:
        """Entries a flush would write (counts of windows whose time is up included)."""
        due = self._windows_due() if self._tallies else 0
        return len(self._pending) + len(self._chained) + due

    def _chain(self) -> None:
        if self._tallies:
            self.close_windows(all_of_them=False)
        if not self._pending:
            return
        head, seq, out = self._head, self._next_seq, self._chained
        for t, principal, action, doctype, doc_id, allowed, reason, count in self._pending:
            fields = [seq, t, principal, action, doctype, doc_id, allowed, reason]
            if count == 1:
                head = chain_hash(head, fields)
                fields.append(head)
            else:
                head = chain_hash(head, [*fields, count])
                fields += [head, count]
            out.append(fields)
            seq += 1
        self._pending.clear()
        self._head, self._next_seq = head, seq

    # --- files -----------------------------------------------------------------------------

    def segment_path(self, index: int) -> Path:
        return self._dir / f"{index:08d}.seg"

    def check_open_segment(self) -> None:
        """At open: the segment being appended to must hold at least the recorded bytes;
        bytes past that (a flush that crashed before its state was written) are dropped."""
        if not self.meta.segments:
            return
        seg = self.meta.segments[-1]
        path = self.segment_path(seg.index)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise TokenStateError(f"audit segment {path} is missing") from None
        if size < seg.length:
            raise TokenStateError(
                f"audit segment {path} holds {size} bytes but the sealed state records "
                f"{seg.length}: it was truncated"
            )
        if size > seg.length:
            with open(path, "r+b") as f:
                f.truncate(seg.length)
                os.fsync(f.fileno())

    def tail_intact(self) -> bool:
        """Whether the segment being appended to holds, authentic, every record and entry the
        meta references. The token asks this at open of a state newer than the anchor: its
        flush wrote the state and the audit record at once, so a crash may have made the
        state durable without the record (that state's answers were never sent)."""
        if not self.meta.segments:
            return True
        seg = self.meta.segments[-1]
        count, last = 0, None
        try:
            for rows in self._read_segment(seg):
                count += len(rows)
                last = rows[-1]
        except _Damaged:
            return False
        return count == seg.entries and (last is None or last[8] == seg.last_hash)

    def stage(self) -> StagedAppend | None:
        """Seal every unflushed entry into one record for the current segment, and the log
        position after it (`write` appends it durably). Not committed until the token state
        referencing it is."""
        self._chain()
        entries = self._chained
        if not entries:
            return None
        segments = list(self.meta.segments)
        if not segments or segments[-1].length >= SEGMENT_MAX_BYTES:
            index = segments[-1].index + 1 if segments else 1
            segments.append(SegmentRef(index, entries[0][0], 0, 0, self.meta.head))
        seg = segments[-1]
        payload = msgpack.packb(entries, use_bin_type=True)
        nonce = os.urandom(_NONCE)
        ad = _RECORD_DOMAIN + _RECORD_AD.pack(seg.index, entries[0][0])
        sealed = nonce + self._aead.encrypt(nonce, payload, ad)
        record = _LEN.pack(len(sealed)) + sealed
        segments[-1] = SegmentRef(
            seg.index, seg.first_seq, seg.entries + len(entries), seg.length + len(record),
            entries[-1][8],
        )
        meta = attrs.evolve(self.meta, next_seq=entries[-1][0] + 1, head=entries[-1][8],
                            segments=tuple(segments))
        return StagedAppend(meta, len(entries), self.segment_path(seg.index), seg.length,
                            record, seg.length == 0)

    def write(self, staged: StagedAppend) -> None:
        """Append a staged record to its segment, durably (no other method touches the
        files, so this may run in another thread while the token writes its state)."""
        path = staged.path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size < staged.old_length:
                raise TokenStateError(
                    f"audit segment {path} holds {size} bytes but the sealed state records "
                    f"{staged.old_length}: it was truncated"
                )
            if size > staged.old_length:  # what a failed flush left: never referenced
                os.ftruncate(fd, staged.old_length)
            os.pwrite(fd, staged.record, staged.old_length)
            datasync(fd)  # the data and the new size; the times need not be durable
        finally:
            os.close(fd)
        if staged.new_segment:
            fsync_dir(self._dir)  # the new file's name

    def commit(self, staged: StagedAppend) -> None:
        self.meta = staged.meta
        del self._chained[: staged.count]

    def abort(self, staged: StagedAppend) -> None:
        """Undo a staged append whose state could not be written (best effort: the bytes
        past the recorded length are ignored and cut at the next open anyway)."""
        try:
            with open(staged.path, "r+b") as f:
                f.truncate(staged.old_length)
        except OSError:
            pass

    def _read_segment(self, seg: SegmentRef) -> Iterator[list[list]]:
        """The records of one segment, decrypted; raises `_Damaged` at the first bad one."""
        path = self.segment_path(seg.index)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _Damaged(seg.first_seq, f"cannot read {path}: {exc.strerror}") from None
        if len(data) < seg.length:
            raise _Damaged(seg.first_seq, f"{path} is truncated")
        offset, seq = 0, seg.first_seq
        while offset < seg.length:
            if offset + _LEN.size > seg.length:
                raise _Damaged(seq, f"{path}: record at byte {offset} is cut short")
            (n,) = _LEN.unpack_from(data, offset)
            start, end = offset + _LEN.size, offset + _LEN.size + n
            if n <= _NONCE or end > seg.length:
                raise _Damaged(seq, f"{path}: record at byte {offset} has a bad length")
            nonce, ct = data[start : start + _NONCE], data[start + _NONCE : end]
            try:
                payload = self._aead.decrypt(
                    nonce, ct, _RECORD_DOMAIN + _RECORD_AD.pack(seg.index, seq)
                )
                rows = msgpack.unpackb(payload, raw=False)
                if not isinstance(rows, list) or not all(_valid_row(row) for row in rows):
                    raise ValueError("not a list of audit rows")
            except (InvalidTag, ValueError, TypeError):
                raise _Damaged(seq, f"{path}: record at byte {offset} fails authentication") from None
            if not rows:
                raise _Damaged(seq, f"{path}: empty record at byte {offset}")
            yield rows
            seq += len(rows)
            offset = end

    # --- reading ---------------------------------------------------------------------------

    def _rows(self, seg: SegmentRef) -> list[list]:
        """Every row of a segment; TokenStateError where it is damaged."""
        try:
            return [row for record in self._read_segment(seg) for row in record]
        except _Damaged as exc:
            raise TokenStateError(
                f"audit log damaged near entry {exc.first_seq}: {exc.why} "
                "(run an audit verification)"
            ) from None

    def search(self, n: int, *, allowed: bool | None = None, principal: str | None = None,
               since: float | None = None) -> list[AuditEntry]:
        """The last `n` entries that match (decision outcome, principal label, at or after a
        Unix time), oldest first. Reads segments newest first and stops at the first one
        that ends before `since`."""
        if n <= 0:
            return []
        self.close_windows()
        self._chain()

        def matches(row: list) -> bool:
            return ((allowed is None or row[6] is allowed)
                    and (principal is None or row[2] == principal)
                    and (since is None or row[1] >= since))

        found = [row for row in self._chained if matches(row)][-n:]
        for seg in reversed(self.meta.segments):
            if len(found) >= n:
                break
            rows = self._rows(seg)
            found = [row for row in rows if matches(row)][-(n - len(found)):] + found
            if since is not None and rows and rows[-1][1] < since:
                break
        return [AuditEntry(*row) for row in found[-n:]]

    def pruned(self, before: float) -> tuple[AuditMeta, list[SegmentRef], int]:
        """The log without its whole segments whose every entry is older than `before`
        (never the segment being written to): (new meta, the segments dropped, how many
        entries they held). The caller commits the meta with the state, then removes the
        files (`remove_segments`), so a crash between the two leaves only stray files."""
        kept = list(self.meta.segments)
        dropped: list[SegmentRef] = []
        while len(kept) > 1:
            rows = self._rows(kept[0])
            if not rows or rows[-1][1] >= before:
                break
            dropped.append(kept.pop(0))
        if not dropped:
            return self.meta, [], 0
        meta = attrs.evolve(self.meta, segments=tuple(kept), base_seq=kept[0].first_seq,
                            base_hash=dropped[-1].last_hash)
        return meta, dropped, sum(seg.entries for seg in dropped)

    def remove_segments(self, segments: list[SegmentRef]) -> None:
        for seg in segments:
            self.segment_path(seg.index).unlink(missing_ok=True)
        if segments:
            fsync_dir(self._dir)

    def remove_stray_segments(self) -> None:
        """At open: segment files older than the first one the state knows are what a prune
        left when it stopped between committing and removing."""
        if not self.meta.segments:
            return
        first = self.meta.segments[0].index
        stray = [p for p in self._dir.glob("*.seg") if p.stem.isdigit() and int(p.stem) < first]
        for path in stray:
            path.unlink(missing_ok=True)

    def tail(self, n: int) -> list[AuditEntry]:
        """The last `n` entries, oldest first (including those not flushed yet)."""
        return self.search(n)

    def verify(self) -> tuple[bool, int, int | None]:
        """(ok, number of entries, index of the first bad entry or None): re-reads every
        segment, recomputes the whole hash chain and checks it against the sealed state
        (from the checkpoint a prune left, if any)."""
        self.close_windows()
        self._chain()
        total = self._next_seq
        head, seq = self.meta.base_hash or self._genesis, self.meta.base_seq
        for seg in self.meta.segments:
            if seg.first_seq != seq:
                return False, total, seq
            try:
                for record in self._read_segment(seg):
                    for row in record:
                        if row[0] != seq or chain_hash(head, _hashed_fields(row)) != row[8]:
                            return False, total, seq
                        head = row[8]
                        seq += 1
            except _Damaged as exc:
                return False, total, exc.first_seq
            if seq != seg.first_seq + seg.entries or head != seg.last_hash:
                return False, total, min(seq, seg.first_seq + seg.entries)
        if head != self.meta.head or seq != self.meta.next_seq:
            return False, total, seq
        for row in self._chained:
            if row[0] != seq or chain_hash(head, _hashed_fields(row)) != row[8]:
                return False, total, seq
            head = row[8]
            seq += 1
        return True, total, None
