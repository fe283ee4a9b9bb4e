"""Which staged chunks the transfers of this process hold (see `base.Store`'s staged chunks).

Staging is durable, but holding is not: two transfers may hold one chunk (two revisions that
carry the same file, or one revision fetched from two peers at once), and the first to release
it must not take it from under the other. Each backend counts holds here and drops a chunk's
staged mark only when no transfer of this process holds it any more. A crash forgets every
hold; what a cut transfer staged then stays for it to resume, until the resume window expires
it (`Store.expire_staged`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from plugshare.store.base import BadRequest


def check_addresses(pieces: list[bytes], checked: list[bytes] | None) -> None:
    """`stage_chunks`' `checked`, where given, is one SHA-256 per piece (`BadRequest`)."""
    if checked is not None and (len(checked) != len(pieces) or any(
            not isinstance(digest, bytes) or len(digest) != 32 for digest in checked)):
        raise BadRequest("checked addresses must be one SHA-256 per chunk staged")


class StagingHolds:
    def __init__(self) -> None:
        self._held: Counter[bytes] = Counter()

    def take(self, digests: Iterable[bytes]) -> None:
        """One hold per digest given (a chunk staged twice by a transfer is held twice)."""
        self._held.update(digests)

    def __contains__(self, digest: object) -> bool:
        return digest in self._held

    def give_back(self, digests: Iterable[bytes]) -> list[bytes]:
        """Drop one hold per digest given; the distinct digests no transfer holds any more
        (a digest not held here at all, e.g. staged by a process that crashed, is among them)."""
        free = []
        for digest in digests:
            count = self._held[digest] - 1
            if count > 0:
                self._held[digest] = count
                continue
            self._held.pop(digest, None)
            free.append(digest)
        return list(dict.fromkeys(free))
