"""Live `_changes` feeds: longpoll, continuous and eventsource, following the store.

A feed waits on `store.wait_for_change` (never a sleep loop), sends a newline every
`heartbeat`, and ends at its `timeout`, at its `limit`, or when the client goes away (the
response stops being iterated). `FeedSlots` bounds how many feeds one principal holds open."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Awaitable

import trio

from plugshare.errors import PlugshareError
from plugshare.node.couch.errors import CouchError, as_couch
from plugshare.store.base import Seq

MAX_FEEDS_PER_PRINCIPAL = 16  # PouchDB's live sync holds one or two per database

ChangesPage = Callable[[Seq, int], Awaitable[tuple[list[dict], Seq]]]


class FeedSlots:
    """How many live feeds each principal has open; one more than the cap is refused (429)."""

    def __init__(self, cap: int = MAX_FEEDS_PER_PRINCIPAL):
        self.cap = cap
        self._open: dict[str, int] = {}

    def take(self, principal: str) -> Callable[[], None]:
        """Take a slot for `principal`; returns the function that gives it back (once)."""
        held = self._open.get(principal, 0)
        if held >= self.cap:
            raise CouchError(429, "too_many_requests",
                             f"at most {self.cap} open changes feeds per credential")
        self._open[principal] = held + 1
        given_back = False

        def release() -> None:
            nonlocal given_back
            if not given_back:
                given_back = True
                left = self._open[principal] - 1
                if left:
                    self._open[principal] = left
                else:
                    del self._open[principal]

        return release


def _row_line(row: dict, feed: str) -> str:
    if feed == "eventsource":
        return f"data: {json.dumps(row)}\nid: {json.dumps(row['seq'])}\n\n"
    return json.dumps(row) + "\n"


def _error_line(exc: CouchError, feed: str) -> str:
    error = json.dumps({"error": exc.error, "reason": exc.reason})
    return f"event: error\ndata: {error}\n\n" if feed == "eventsource" else error + "\n"


def _end_line(last_seq: Seq, feed: str) -> str:
    if feed == "eventsource":
        return ""
    return json.dumps({"last_seq": last_seq}) + "\n"


async def follow(page: ChangesPage, wait_for_change: Callable[[Seq], Awaitable[None]], *,
                 feed: str, since: Seq, limit: int | None, heartbeat: float | None,
                 timeout: float | None) -> AsyncIterator[str]:
    """The text of a live feed. `page(since, n)` is (rows, last_seq) of at most n visible
    changes after `since`; `wait_for_change(seq)` returns once the store has one after it."""
    # The status line is sent by now: a refusal (the credential revoked meanwhile, the
    # store gone) ends the feed with CouchDB's error object, not with a connection cut.
    lines = _follow(page, wait_for_change, feed=feed, since=since, limit=limit,
                    heartbeat=heartbeat, timeout=timeout)
    try:
        async with aclosing(lines):  # closed with this one when the client goes
            async for line in lines:
                yield line
    except PlugshareError as exc:
        yield _error_line(as_couch(exc), feed)


async def _follow(page: ChangesPage, wait_for_change: Callable[[Seq], Awaitable[None]], *,
                  feed: str, since: Seq, limit: int | None, heartbeat: float | None,
                  timeout: float | None) -> AsyncIterator[str]:
    deadline = math.inf if timeout is None else trio.current_time() + timeout
    remaining = math.inf if limit is None else limit
    seq = since
    while True:
        rows, seq = await page(seq, int(min(remaining, 10_000)))
        if feed == "longpoll" and rows:
            yield json.dumps({"results": rows, "last_seq": seq}) + "\n"
            return
        for row in rows:
            yield _row_line(row, feed)
        remaining -= len(rows)
        if remaining <= 0:
            yield _end_line(seq, feed)
            return
        woke = await _wait(wait_for_change, seq, heartbeat, deadline)
        if woke == "timeout":
            if feed == "longpoll":
                yield json.dumps({"results": [], "last_seq": seq}) + "\n"
            else:
                yield _end_line(seq, feed)
            return
        if woke == "heartbeat":
            yield "\n"


async def _wait(wait_for_change: Callable[[Seq], Awaitable[None]], seq: Seq,
                heartbeat: float | None, deadline: float) -> str:
    """"change", "heartbeat" (time to send a newline) or "timeout"."""
    now = trio.current_time()
    step = min(heartbeat if heartbeat else math.inf, deadline - now)
    if step <= 0:
        return "timeout"
    with trio.move_on_after(step):
        await wait_for_change(seq)
        return "change"
    return "timeout" if trio.current_time() >= deadline else "heartbeat"


