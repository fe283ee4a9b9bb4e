"""The node's sweep of staged chunks (what transfers cut for good left): at start, then
every STAGED_EXPIRY_EVERY seconds, on a real store, the hours jumped on trio's MockClock."""

import time

import pytest
import trio
import trio.testing

from plugshare.node.node import STAGED_EXPIRY_EVERY, sweep_staged_chunks
from plugshare.store.base import NotFound
from plugshare.store.sqlite import SQLiteStore


async def gone(store, digest) -> bool:
    try:
        await store.read_staged_chunk(digest)
    except NotFound:
        return True
    return False


async def until_gone(store, digest) -> None:
    """The clock stands still (rate 0): wait in real time for the store's threads."""
    deadline = time.monotonic() + 20
    while not await gone(store, digest):
        assert time.monotonic() < deadline, "not swept"
        await trio.lowlevel.checkpoint()


async def test_staged_chunks_are_swept_at_start_and_then_every_hour(tmp_path, mock_clock):
    store = await SQLiteStore.open(tmp_path / "store.sqlite")
    try:
        [before] = await store.stage_chunks([b"left before the start"])
        await store.release_chunks([before], keep_staged=True)  # a cut transfer's
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sweep_staged_chunks, store, 0)  # resume window: none
            await until_gone(store, before)  # swept at start

            [later] = await store.stage_chunks([b"left after the start"])
            await store.release_chunks([later], keep_staged=True)
            mock_clock.jump(STAGED_EXPIRY_EVERY - 60)
            await trio.testing.wait_all_tasks_blocked()
            assert not await gone(store, later)  # not yet an hour
            mock_clock.jump(120)
            await until_gone(store, later)  # swept by the hourly pass
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
