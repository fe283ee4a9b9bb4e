"""Documents cut into pages the token takes in one command each: a command carries at most
TOKEN_BATCH documents and about TOKEN_BYTES of them, so no number or size of documents can
make one over the token's 64 MiB frame cap."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

TOKEN_BATCH = 10_000  # documents the token takes in one command
# About this much JSON per token command: a quarter of its 64 MiB frame cap, a margin that
# covers msgpack's wider encodings (a float is 9 bytes, "0.5" is 3 characters).
TOKEN_BYTES = 16 * 1024 * 1024


def json_size(doc: Any) -> int:
    """About how many bytes `doc` takes on the wire (JSON escapes non-ASCII text, so text
    never counts for less than its UTF-8)."""
    return len(json.dumps(doc, separators=(",", ":"))) if doc is not None else 0


def token_pages(items: list, size: Callable[[Any], int] = json_size, *,
                batch: int = TOKEN_BATCH) -> Iterator[list]:
    """`items` cut into pages the token takes in one command: at most `batch` of them and
    about TOKEN_BYTES (a page holds one item at least)."""
    page: list = []
    used = 0
    for item in items:
        weight = size(item)
        if page and (len(page) >= batch or used + weight > TOKEN_BYTES):
            yield page
            page, used = [], 0
        page.append(item)
        used += weight
    if page:
        yield page
