"""`plugshare watch` readable from 80×24 up (issue #11 item 5): textual's Pilot at 80×24 and
120×36 against a real `/events` + `/status` server (BusServer), checking what a person sees:
the summary on one line, the shares table keeping its State column, events wrapped at word
boundaries instead of cut, no scrollbar glyphs in the middle of the text, tables that stop
claiming "connected" and "live" once the node is gone, pending counts that say so, and every
node's tab reachable from the keyboard."""

from __future__ import annotations

import asyncio

import pytest

from plugshare.node.events import ApiTarget, Event
from plugshare.node.watch import WatchApp, details, event_line
from tests.node.test_events import CREDENTIAL, BusServer
from tests.node.test_watch import LIVE_STATUS, shows

SIZES = [(80, 24), (120, 36)]
SCROLLBAR_GLYPHS = set("▁▂▃▄▅▆▇█▏▎▍▌▋▊▉▐▔")


def lines_of(screen: str) -> list[str]:
    return screen.splitlines()


@pytest.mark.parametrize("size", SIZES)
def test_summary_tables_and_state_fit_the_terminal(size):
    with BusServer(LIVE_STATUS) as server:
        async def scenario():
            app = WatchApp([server.target()], poll=0.2, retry=0.2)
            async with app.run_test(size=size) as pilot:
                screen = await shows(pilot, "testnode", "Shares", "● live", "25% 10/40")
                lines = lines_of(screen)
                summary = next(i for i, line in enumerate(lines) if "testnode" in line)
                assert lines[summary + 1].strip() == "Peers", screen  # one line, no wrap
                header = next(line for line in lines if "Share" in line and "Peer" in line)
                assert "State" in header, screen
                assert "● yes" in screen  # the peers table's Connected column
                assert not SCROLLBAR_GLYPHS & set(screen), screen
                await pilot.press("q")

        asyncio.run(scenario())


def test_pending_columns_say_they_count_pending_docs():
    with BusServer(LIVE_STATUS) as server:
        async def scenario():
            app = WatchApp([server.target()], poll=0.2, retry=0.2)
            async with app.run_test(size=(120, 36)) as pilot:
                screen = await shows(pilot, "Shares", "● live")
                header = next(line for line in lines_of(screen)
                              if "Share" in line and "Peer" in line)
                assert "pending" in header.lower(), header
                await pilot.press("q")

        asyncio.run(scenario())


def test_a_long_event_wraps_at_word_boundaries_at_80_columns():
    with BusServer(LIVE_STATUS) as server:
        async def scenario():
            app = WatchApp([server.target()], poll=0.2, retry=0.2)
            async with app.run_test(size=(80, 24)) as pilot:
                await shows(pilot, "event stream connected")
                await asyncio.to_thread(
                    server.publish, "sync.batch_received", share="notes", peer="bob",
                    docs=12, written=11, refused=1, bytes=123456,
                    last_id="a-rather-long-document-identifier-0123456789")
                screen = await shows(pilot, "sync.batch_received")
                for word in ("written=11", "refused=1", "bytes=123456",
                             "last_id=a-rather-long-document-identifier-0123456789"):
                    assert word in screen, screen
                await pilot.press("q")

        asyncio.run(scenario())


def test_null_values_are_left_out_of_event_details():
    assert details({"docs": 3, "total": None}) == "docs=3"
    line = event_line(Event(1_700_000_000.0, "sync.progress", "notes", "bob",
                            {"done": 5, "total": None}))
    assert "null" not in line and "done=5" in line


def test_when_the_node_goes_away_the_tables_stop_saying_connected_and_live():
    server = BusServer(LIVE_STATUS).__enter__()
    try:
        async def scenario():
            app = WatchApp([server.target()], poll=0.2, retry=0.2)
            async with app.run_test(size=(80, 24)) as pilot:
                await shows(pilot, "● yes", "● live")
                await asyncio.to_thread(server.stop)
                screen = await shows(pilot, "offline", absent=("● yes", "● live"))
                assert "notes" in screen  # what was known stays, marked as unknown now
                await pilot.press("q")

        asyncio.run(scenario())
    finally:
        server.stop()


def test_every_node_tab_is_reachable_from_the_keyboard():
    with BusServer({"name": "first"}) as one, BusServer({"name": "second"}) as two:
        async def scenario():
            app = WatchApp([ApiTarget.at(one.url, CREDENTIAL, label="alice"),
                            ApiTarget.at(two.url, CREDENTIAL, label="bob")], poll=0.2)
            async with app.run_test(size=(80, 24)) as pilot:
                await shows(pilot, "first")
                await pilot.press("2")
                await shows(pilot, "second", absent=("first",))
                await pilot.press("1")
                await shows(pilot, "first", absent=("second",))
                await pilot.press("tab")
                await shows(pilot, "second", absent=("first",))
                await pilot.press("q")

        asyncio.run(scenario())
