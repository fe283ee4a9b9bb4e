"""`plugshare watch` as a person uses it: the full-screen view driven with textual's Pilot
(on asyncio, hence plain sync tests calling `asyncio.run`) against real nodes and against a
real `/events` server; `--plain` as a real command line."""

from __future__ import annotations

import asyncio
import io
import json
import queue
import re
import signal
import socketserver
import subprocess
import sys
import threading
import time

import trio
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from plugshare.node.events import ApiTarget, Event, EventBus
from plugshare.node.home import Home
from plugshare.node.progress import SyncSummary, SyncTracker, follow_sync
from plugshare.node.watch import (
    LogFilter,
    Rate,
    SyncRates,
    WatchApp,
    event_line,
    fmt_duration,
    follow_plain,
    peer_rows,
    progress_text,
    share_rows,
    summary_text,
)
from tests.node.conftest import init_node, start_node
from tests.node.test_events import CREDENTIAL, BusServer, make_app, serve_app

NOW = 1_700_000_000.0

FULL_STATUS = {
    "name": "alice", "node_id": "TZJBRPT-FI7VJY3-Q337M7J-GP4KA32-3WFBIDC-M2RBHPY-YCWTRZD-4CCPZQR",
    "api": "http://127.0.0.1:7414", "peer_address": "127.0.0.1:7415",
    "store": {"backend": "sqlite", "doc_count": 42, "update_seq": 97},
    "peers": [
        {"id": "ABCDEFG-HIJKLMN", "name": "bob", "addresses": ["127.0.0.1:9001", "10.0.0.2:9001"],
         "connected": True, "rtt_ms": 0.84, "last_seen": NOW - 3},
        {"id": "QQQQQQQ-RRRRRRR", "name": "carol", "addresses": [], "connected": False,
         "rtt_ms": None, "last_seen": None},
    ],
    "shares": [
        {"id": "s1", "name": "notes", "role": "owner", "permission": "write", "status": "active",
         "doctype": "io.notes", "members": 3, "docs": 40,
         "peers": [
             {"peer": "bob", "state": "live", "done": 40, "total": 40, "pending_out": 0,
              "pending_in": 2, "lag_ms": 12.5, "last_sync": NOW - 1},
             {"peer": "carol", "state": "initial", "done": 10, "total": 40, "pending_out": 30,
              "pending_in": 0, "lag_ms": None, "last_sync": None},
         ]},
        {"id": "s2", "name": "photos", "role": "member", "permission": "read", "status": "revoked",
         "doctype": "io.photos", "members": 2, "docs": 2, "peers": []},
    ],
    "events_dropped": 5,
}

# -- the pure formatting ----------------------------------------------------------------------


def test_status_renders_every_part():
    assert summary_text(FULL_STATUS) == (
        "alice  TZJBRPT…  sqlite · 42 docs · seq 97  5 events dropped  "
        "api http://127.0.0.1:7414  peers at 127.0.0.1:7415")
    assert peer_rows(FULL_STATUS, NOW) == [
        ("bob", "ABCDEFG…", "127.0.0.1:9001 +1", "● yes", "0.8 ms", "3s ago"),
        ("carol", "QQQQQQQ…", "—", "○ no", "—", "—"),
    ]
    assert share_rows(FULL_STATUS, NOW) == [
        ("notes", "bob", "owner", "read-write", "3", "40", "2", "0", "12.5 ms", "1s ago",
         "● live"),
        ("", "carol", "owner", "read-write", "3", "40", "0", "30", "—", "—",
         "▰▰▱▱▱▱▱▱▱▱ 25% 10/40"),
        ("photos", "—", "member", "read-only", "2", "2", "—", "—", "—", "—", "revoked"),
    ]


def test_an_older_or_newer_status_still_renders():
    odd = {"name": "x", "store": {"backend": "couchdb", "doc_count": "many"},
           "peers": [{"name": "p", "connected": "yes", "rtt_ms": True}, "not-a-peer"],
           "shares": [{"name": "s", "peers": [{"peer": "p", "state": "syncing-v2"}]},
                      {"id": "only-an-id"}],
           "something_new": {"a": 1}}
    assert summary_text(odd) == "x  —  couchdb"
    assert summary_text({}) == "?  —"
    assert peer_rows(odd, NOW) == [("p", "—", "—", "?", "—", "—"),
                                   ("?", "—", "—", "?", "—", "—")]
    assert share_rows(odd, NOW) == [
        ("s", "p", "?", "?", "?", "?", "—", "—", "—", "—", "syncing-v2"),
        ("only-an-id", "—", "?", "?", "?", "?", "—", "—", "—", "—", "no peer yet"),
    ]
    assert peer_rows({"peers": "nope"}, NOW) == [] and share_rows({"shares": 3}, NOW) == []
    # members as a list, a status word of its own, per-direction counts, an error's reason
    other = {"shares": [{"name": "n", "role": "owner", "permission": "write", "status": "owner",
                         "docs": 9, "members": [{"name": "a", "status": "active"},
                                                {"name": "b", "status": "revoked"},
                                                {"name": "c", "status": "active"}],
                         "peers": [{"peer": "a", "state": "initial", "sent": 2, "received": 3},
                                   {"peer": "c", "state": "error", "error": "x" * 50}]}]}
    assert share_rows(other, NOW) == [
        ("n", "a", "owner", "read-write", "2", "9", "—", "—", "—", "—", "initial 5 docs"),
        ("", "c", "owner", "read-write", "2", "9", "—", "—", "—", "—",
         "✖ error: " + "x" * 40 + "…"),
    ]


def test_an_initial_sync_shows_its_size_rate_and_eta_when_known():
    assert progress_text(400, 1000, size=98_600, rate=Rate(docs=20.0, bytes=4_930.0)) == (
        "▰▰▰▰▱▱▱▱▱▱ 40% 400/1000 98.6 kB 4.9 kB/s ETA 30s")
    assert progress_text(7, None, size=500, rate=Rate(docs=2.0, bytes=100.0)) == (
        "initial 7 docs 500 B 100 B/s")  # no total: no ETA
    assert progress_text(10, 10, rate=Rate(docs=0.0, bytes=0.0)) == "▰▰▰▰▰▰▰▰▰▰ 100% 10/10"
    assert [fmt_duration(s) for s in (0.4, 59, 185, 7620)] == ["0s", "59s", "3m05s", "2h07m"]

    def status(done, size, state="initial"):
        return {"shares": [{"name": "notes", "peers": [
            {"peer": "bob", "state": state, "done": done, "total": 100, "bytes": size}]}]}

    rates = SyncRates()
    rates.observe(status(10, 1_000), NOW)
    assert rates.get("notes", "bob") is None  # one look gives no rate
    rates.observe(status(50, 9_000), NOW + 2)
    assert rates.get("notes", "bob") == Rate(docs=20.0, bytes=4_000.0)
    [row] = share_rows(status(50, 9_000), NOW + 2, rates)
    assert row[-1] == "▰▰▰▰▰▱▱▱▱▱ 50% 50/100 9.0 kB 4.0 kB/s ETA 2s"
    rates.observe(status(5, 500), NOW + 3)  # fewer done: a new sync, measured afresh
    assert rates.get("notes", "bob") is None
    rates.observe(status(100, 20_000, "live"), NOW + 4)
    assert rates.get("notes", "bob") is None


def test_progress_event_lines_and_filters():
    assert progress_text(0, 10) == "▱▱▱▱▱▱▱▱▱▱ 0% 0/10"
    assert progress_text(10, 10) == "▰▰▰▰▰▰▰▰▰▰ 100% 10/10"
    assert progress_text(7, None) == "initial 7 docs"
    event = Event(NOW, "doc.written", "notes", None,
                  {"id": "n1", "rev": "1-ab", "title": "two words"})
    line = event_line(event)
    assert line.endswith('doc.written         notes      -          id=n1 rev=1-ab '
                         'title="two words"')
    assert event_line(event, date=True).startswith(
        time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(NOW)) + ".000 ")
    by_share = LogFilter.parse("share:notes")
    assert by_share == LogFilter(share="notes") and str(by_share) == "share:notes"
    assert by_share.matches(event)
    assert not by_share.matches(Event(NOW, "doc.written", "photos"))
    assert by_share.matches(Event(NOW, "events.dropped", data={"count": 3}))
    word = LogFilter.parse("BO")
    assert word.matches(Event(NOW, "peer.connected", None, "bob"))
    assert not word.matches(event)
    assert not LogFilter.parse("  ")


# -- the full-screen view -----------------------------------------------------------------------


def screen_text(app) -> str:
    """What the terminal shows, as text."""
    return "\n".join("".join(segment.text for segment in strip)
                     for strip in app.screen._compositor.render_strips())


async def shows(pilot, *texts: str, timeout: float = 20, absent: tuple[str, ...] = ()) -> str:
    """Wait until the screen shows every text (and none of `absent`); returns the screen."""
    deadline = time.monotonic() + timeout
    while True:
        await pilot.pause()
        text = screen_text(pilot.app)
        if all(t in text for t in texts) and not any(t in text for t in absent):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"the screen never showed {texts} without {absent}:\n{text}")
        await asyncio.sleep(0.05)


def test_the_view_follows_a_real_node_through_a_restart(tmp_path):
    home = tmp_path / "alice"
    init_node(home, "--name", "alice")
    running = start_node(home)
    target = ApiTarget.of_home(Home(home))

    async def scenario():
        nonlocal running
        app = WatchApp([target], poll=0.2, retry=0.2)
        async with app.run_test(size=(120, 32)) as pilot:
            await shows(pilot, "alice", "sqlite · 0 docs", "p Pause log", "f Filter log",
                        "q Quit")
            put = await asyncio.to_thread(running.cli, "doc", "put", "io.notes", '{"a": 1}',
                                          "--id", "first-note")
            assert put.returncode == 0, put.stderr
            await shows(pilot, "sqlite · 1 doc ", "doc.written", "id=first-note")

            await asyncio.to_thread(running.stop)
            await shows(pilot, "node offline — retrying", "no node is running for")
            running = await asyncio.to_thread(start_node, home)  # on another port
            screen = await shows(pilot, running.api_url, "node.started",
                                 absent=("node offline",))
            assert "sqlite · 1 doc " in screen and "id=first-note" in screen
            await pilot.press("q")
        assert app.return_code == 0

    try:
        asyncio.run(scenario())
    finally:
        running.stop()


LIVE_STATUS = {**FULL_STATUS, "name": "testnode"}


def test_events_appear_pause_and_filter():
    with BusServer(LIVE_STATUS) as server:
        async def scenario():
            app = WatchApp([server.target()], poll=0.2, retry=0.2)
            async with app.run_test(size=(130, 40)) as pilot:
                screen = await shows(pilot, "testnode", "event stream connected to")
                # the tables, with the initial sync's progress bar
                assert "127.0.0.1:9001 +1" in screen and "● yes" in screen
                assert "▰▰▱▱▱▱▱▱▱▱ 25% 10/40" in screen and "read-write" in screen

                await asyncio.to_thread(server.publish, "doc.written", share="notes",
                                        id="n1", doctype="io.notes", rev="1-aa")
                await shows(pilot, "doc.written", "id=n1 doctype=io.notes rev=1-aa")

                await pilot.press("p")
                await shows(pilot, "PAUSED (0 new)")
                await asyncio.to_thread(server.publish, "sync.batch_sent", share="notes",
                                        peer="bob", docs=3, bytes=1200)
                await shows(pilot, "PAUSED (1 new)", absent=("docs=3 bytes=1200",))
                await pilot.press("p")
                await shows(pilot, "docs=3 bytes=1200", absent=("PAUSED",))

                await asyncio.to_thread(server.publish, "share.created", share="photos")
                await shows(pilot, "share.created")
                await pilot.press("f")
                for key in "share:photos":
                    await pilot.press(key)
                await pilot.press("enter")
                await shows(pilot, "filter: share:photos", "share.created",
                            absent=("id=n1", "docs=3"))
                await pilot.press("f")  # the box opens with the filter in force; clear it
                for _ in "share:photos":
                    await pilot.press("backspace")
                await pilot.press("enter")
                await shows(pilot, "id=n1", "docs=3", "share.created", absent=("filter:",))
                await pilot.press("q")

        asyncio.run(scenario())


def test_a_wrong_credential_is_a_clear_message_not_a_traceback():
    with BusServer(LIVE_STATUS) as server:
        async def scenario():
            app = WatchApp([ApiTarget.at(server.url, "not-the-credential", label="testnode")],
                           poll=0.2, retry=0.2)
            async with app.run_test(size=(140, 30)) as pilot:
                await shows(pilot, "the node refused the credential (HTTP 401: unknown "
                                   "credential) — check the owner credential of testnode")
                await pilot.press("q")
            assert app.return_code == 0

        asyncio.run(scenario())


class _CutHandler(socketserver.StreamRequestHandler):
    """/status answers; /events sends one whole line and half of the next, then hangs up."""

    def handle(self):
        request = self.rfile.readline().decode()
        while self.rfile.readline() not in (b"\r\n", b""):
            pass
        if request.startswith("GET /status"):
            body = json.dumps({"name": "cutnode"}).encode()
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
                             + body)
        else:
            body = (json.dumps({"type": "share.joined", "time": time.time(), "share": "cutshare"})
                    .encode() + b'\n{"type": "doc.wr')
            self.wfile.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                             + b"%x\r\n" % len(body) + body + b"\r\n")


def test_a_stream_cut_mid_line_is_shown_and_the_view_keeps_going():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _CutHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        async def scenario():
            app = WatchApp([ApiTarget.at(url, "c", label="cutnode")], poll=0.2, retry=0.2)
            async with app.run_test(size=(140, 30)) as pilot:
                screen = await shows(pilot, "cutnode", "share.joined", "cutshare",
                                     "the event stream was cut mid-line (16 bytes lost")
                assert "Traceback" not in screen
                await pilot.press("q")

        asyncio.run(scenario())
    finally:
        server.shutdown()
        server.server_close()


def test_a_terminal_too_small_says_so_until_it_grows():
    with BusServer(LIVE_STATUS) as server:
        async def scenario():
            app = WatchApp([server.target()], poll=0.2)
            async with app.run_test(size=(40, 10)) as pilot:
                await shows(pilot, "The terminal is too small (40×10)")
                await pilot.resize_terminal(120, 30)
                await shows(pilot, "testnode", "Shares", absent=("too small",))
                await pilot.press("q")

        asyncio.run(scenario())


def test_several_nodes_get_a_tab_each():
    with BusServer({"name": "first"}) as one, BusServer({"name": "second"}) as two:
        async def scenario():
            app = WatchApp([ApiTarget.at(one.url, CREDENTIAL, label="one"),
                            ApiTarget.at(two.url, CREDENTIAL, label="two")], poll=0.2)
            async with app.run_test(size=(120, 30)) as pilot:
                await shows(pilot, "one", "two", "first")
                app.query_one("TabbedContent").active = "node-1"
                await shows(pilot, "second", absent=("first",))
                await pilot.press("q")

        asyncio.run(scenario())


# -- --plain -------------------------------------------------------------------------------------


async def test_plain_prints_lines_and_reconnects_when_the_node_comes_back(nursery):
    bus = EventBus()
    servers: list[trio.CancelScope] = []

    async def serve(port=0, *, task_status):
        with trio.CancelScope() as scope:
            servers.append(scope)
            await serve_app(make_app(bus, {}), port=port, task_status=task_status)

    url = await nursery.start(serve)
    port = int(url.rsplit(":", 1)[1])
    out = io.StringIO()
    target = ApiTarget.at(url, CREDENTIAL, label="testnode")

    async def lines_with(text: str) -> list[str]:
        with trio.fail_after(20):
            while text not in out.getvalue():
                await trio.sleep(0.02)
        return out.getvalue().splitlines()

    bus.publish("node.started")  # before the watch: only `recent` brings it
    async with trio.open_nursery() as watching:
        watching.start_soon(lambda: follow_plain([target], out, recent=5, retry=0.1))
        await lines_with("node.started")
        bus.publish("sync.conflict", share="notes", peer="bob", id="n1", revs=["2-a", "2-b"])
        lines = await lines_with("sync.conflict")
        assert lines[0].endswith(f"-- testnode: connected to {url}")
        assert lines[1].split(" ", 1)[1].startswith("node.started")
        assert lines[2].split(" ", 1)[1] == (
            'sync.conflict       notes      bob        id=n1 revs=["2-a", "2-b"]')

        servers[0].cancel()  # the node goes away...
        await lines_with("retrying every 0.1 s")
        bus.publish("share.joined", share="later")  # ...and comes back, same port
        await nursery.start(serve, port)
        lines = await lines_with("share.joined")
        assert sum("connected to" in line for line in lines) == 2
        assert sum("node.started" in line for line in lines) == 1  # no replayed duplicates
        watching.cancel_scope.cancel()


async def test_plain_json_gives_ndjson(nursery):
    bus = EventBus()
    url = await nursery.start(serve_app, make_app(bus, {}))
    out = io.StringIO()
    async with trio.open_nursery() as watching:
        watching.start_soon(lambda: follow_plain([ApiTarget.at(url, CREDENTIAL)], out,
                                                 as_json=True, share="notes", retry=0.1))
        with trio.fail_after(20):
            while not bus.subscribers:
                await trio.sleep(0.02)
        bus.publish("doc.written", share="photos", id="skip")
        event = bus.publish("doc.written", share="notes", id="keep", rev="1-x")
        with trio.fail_after(20):
            while not out.getvalue():
                await trio.sleep(0.02)
        watching.cancel_scope.cancel()
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [event.as_dict()]


class Output:
    """A process's output lines, gathered by threads so a test can wait for one."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(process.stdout,), daemon=True).start()
        threading.Thread(target=lambda: self.errors.extend(process.stderr), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _report(self, what: str) -> str:
        return (f"{what} in:\n" + "\n".join(self.lines)
                + ("\nstderr:\n" + "".join(self.errors) if self.errors else ""))

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        for line in self.lines:
            if text in line:
                return line
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(self._report(f"no line with {text!r}"))
            if line is None:
                raise AssertionError(self._report(f"the output ended without {text!r}"))
            self.lines.append(line)
            if text in line:
                return line


def interrupt(process: subprocess.Popen, timeout: float = 60) -> int:
    """Ctrl-C, as a person would; a kill only if that did not end it."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


# Runs the real command line with `watch` (and `demo`) added, whether or not cli.py has them yet.
CLI = ("from plugshare.cli import cli; from plugshare.node.watch import watch; "
       "from plugshare.node.demo import demo; cli.add_command(watch); cli.add_command(demo); "
       "cli(prog_name='plugshare')")


def plugshare_cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLI, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_plain_command_survives_a_restart_and_exits_0_on_ctrl_c(tmp_path):
    home = tmp_path / "alice"
    init_node(home, "--name", "alice")
    running = start_node(home)
    watcher = plugshare_cli("--home", str(home), "watch", "--plain")
    try:
        output = Output(watcher)
        output.wait_for(" -- alice: ")  # connected (or told why the stream is not there)
        running.stop()
        assert "retrying every 1 s" in output.wait_for(" -- alice: no node ")
        running = start_node(home)
        output.wait_for(running.api_url)  # found the node again, on its new port
        assert interrupt(watcher) == 0
        assert "Traceback" not in "".join(output.errors)
    finally:
        interrupt(watcher)
        running.stop()


def test_plain_command_refused_credential_and_missing_home_are_one_clear_line(tmp_path):
    home = tmp_path / "alice"
    init_node(home, "--name", "alice")
    running = start_node(home)
    try:
        (home / "owner.credential").write_text("0" * 43 + "\n")  # not the node's credential
        refused = plugshare_cli("--home", str(home), "watch", "--plain")
        _, err = refused.communicate(timeout=60)
        assert refused.returncode == 1
        assert err.count("\n") == 1
        assert "alice: the node refused the credential (HTTP 401" in err
    finally:
        running.stop()
    missing = plugshare_cli("--home", str(tmp_path / "nothing"), "watch")
    _, err = missing.communicate(timeout=60)
    assert missing.returncode == 1 and err.count("\n") == 1
    assert "is not a plugshare home" in err


# -- progress of an initial sync (share accept) -------------------------------------------------


def test_the_tracker_folds_events_and_status_into_one_picture():
    tracker = SyncTracker("notes")
    assert tracker.state is None and not tracker.live and tracker.total is None
    assert not tracker.on_event(Event(NOW, "sync.state", "photos", "bob", {"state": "live"}))
    assert tracker.on_event(Event(NOW, "sync.state", "notes", "bob",
                                  {"state": "initial", "done": 0, "total": 50}))
    assert tracker.on_event(Event(NOW, "sync.batch_received", "notes", "bob",
                                  {"docs": 20, "written": 19, "refused": 1, "bytes": 4000}))
    assert tracker.on_status({"shares": [
        {"name": "notes", "peers": [{"peer": "bob", "state": "initial", "done": 20, "total": 50},
                                    {"peer": "carol", "state": "offline", "done": 5}]},
        {"name": "photos", "peers": [{"peer": "bob", "state": "live", "done": 9}]}]})
    assert (tracker.state, tracker.done, tracker.total, tracker.docs, tracker.bytes) == (
        "initial", 20, 50, 19, 4000)
    assert not tracker.on_status({"shares": "garbage"})
    assert tracker.on_status({"shares": [{"name": "notes", "peers": [
        {"peer": "dave", "state": "initial", "sent": 4, "received": 30}]}]})
    assert tracker.done == 34  # counted each direction apart; the furthest peer leads
    tracker.on_event(Event(NOW, "sync.state", "notes", "bob", {"state": "live", "done": 50,
                                                               "total": 50}))
    assert tracker.live and tracker.state == "live"
    # /status counts the bytes of batches from before the following began, too
    tracker.on_status({"shares": [{"name": "notes", "peers": [
        {"peer": "bob", "state": "live", "done": 50, "total": 50, "bytes": 9000}]}]})
    assert tracker.bytes == 9000
    summary = tracker.summary("live")
    assert summary.line().startswith("notes: initial sync done — 50 docs, 9.0 kB in ")
    assert summary.line().endswith(" s; live")
    stopped = SyncSummary("notes", False, "initial", 20, 50, 19, 4000, 61.0, "timeout")
    assert stopped.line() == ("notes: not live after 61 s (state initial, 20/50 docs, 4.0 kB); "
                              "the sync goes on in the background — `plugshare watch` shows it")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_progress_off_a_terminal_is_one_summary_line(nursery):
    bus = EventBus()
    status: dict = {"shares": [{"name": "notes", "peers": [
        {"peer": "alice", "state": "initial", "done": 0, "total": 3}]}]}
    url = await nursery.start(serve_app, make_app(bus, status))
    out = io.StringIO()
    result = {}

    async def follow():
        result["summary"] = await follow_sync(ApiTarget.at(url, CREDENTIAL), "notes", file=out,
                                              poll=0.1, timeout=60)

    async with trio.open_nursery() as inner:
        inner.start_soon(follow)
        with trio.fail_after(20):
            while not bus.subscribers:
                await trio.sleep(0.02)
        bus.publish("sync.batch_received", share="notes", peer="alice", docs=2, written=2,
                    refused=0, bytes=500)
        bus.publish("sync.state", share="photos", peer="alice", state="live")  # not ours
        bus.publish("sync.state", share="notes", peer="alice", state="initial", done=2, total=3)
        await trio.sleep(0.3)
        assert out.getvalue() == ""  # nothing noisy while it runs
        bus.publish("sync.batch_received", share="notes", peer="alice", docs=1, written=1,
                    refused=0, bytes=300)
        bus.publish("sync.state", share="notes", peer="alice", state="live", done=3, total=3)
    summary = result["summary"]
    assert (summary.live, summary.reason, summary.done, summary.total, summary.docs,
            summary.bytes) == (True, "live", 3, 3, 3, 800)
    (line,) = out.getvalue().splitlines()
    assert line.startswith("notes: initial sync done — 3 docs, 800 B in ") and line.endswith("live")


async def test_progress_when_live_already_or_when_nothing_moves(nursery):
    bus = EventBus()
    status: dict = {"shares": [{"name": "notes", "peers": [
        {"peer": "alice", "state": "live", "done": 7, "total": 7}]}]}
    url = await nursery.start(serve_app, make_app(bus, status))
    target = ApiTarget.at(url, CREDENTIAL)
    out = io.StringIO()
    with trio.fail_after(20):
        summary = await follow_sync(target, "notes", file=out, poll=0.1)
    assert summary.live and summary.done == 7
    assert out.getvalue().startswith("notes: initial sync done — 7 docs in ")

    stuck = io.StringIO()
    with trio.fail_after(20):
        summary = await follow_sync(target, "other", file=stuck, poll=0.1, stall_timeout=0.5)
    assert not summary.live and summary.reason == "stalled"
    assert re.fullmatch(r"other: no progress for a while \(\d+ s in\) \(state unknown, 0 docs\); "
                        r"the sync goes on in the background — `plugshare watch` shows it\n",
                        stuck.getvalue())


async def test_progress_without_an_events_stream_polls_status(nursery):
    status: dict = {"shares": [{"name": "notes", "peers": [
        {"peer": "alice", "state": "initial", "done": 1, "total": 4, "bytes": 2500}]}]}

    async def get_status(request):
        return JSONResponse(status)

    url = await nursery.start(serve_app, Starlette(routes=[Route("/status", get_status)]))
    out = Terminal()
    result = {}

    async def follow():
        result["summary"] = await follow_sync(ApiTarget.at(url, "any"), "notes", file=out,
                                              poll=0.05, timeout=60)

    async with trio.open_nursery() as inner:
        inner.start_soon(follow)
        with trio.fail_after(20):
            while "notes (initial)" not in out.getvalue():  # the bar, on a terminal
                await trio.sleep(0.02)
        bar = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.getvalue())  # the text, not its styles
        assert "25% 1/4 docs" in bar and "2.5 kB" in bar and "ETA" in bar
        status["shares"][0]["peers"][0].update(state="live", done=4)
    assert result["summary"].live
    bar_cleared, summary_line = out.getvalue().splitlines()[-1].rsplit("\x1b[2K", 1)
    assert summary_line.startswith("notes: initial sync done — 4 docs, 2.5 kB in ")


def test_a_stale_status_answer_never_takes_the_count_back():
    """The race behind `test_progress_off_a_terminal_is_one_summary_line` failing on busy
    machines: a /status poll answered before the last event arrives after it."""
    tracker = SyncTracker("notes")
    tracker.on_event(Event(time.time(), "sync.state", share="notes", peer="alice",
                           data={"state": "live", "done": 3, "total": 3}))
    tracker.on_status({"shares": [{"name": "notes", "peers": [
        {"peer": "alice", "state": "initial", "done": 0, "total": 3}]}]})
    assert tracker.done == 3 and tracker.summary("live").done == 3
