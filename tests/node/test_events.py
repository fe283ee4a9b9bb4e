"""The events bus, the NDJSON wire format, `GET /events` over real HTTP (the node's
own server on loopback) and the stream readers `watch` and the progress display use.

`BusServer` (a Starlette app with the real `events_route` and a `/status` answer, behind a
bearer check) is also used by test_watch.py."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.routing import Route

from plugshare.node import http_server
from plugshare.node.events import (
    DROPPED,
    HEARTBEAT,
    AccessRefused,
    ApiTarget,
    BadEvent,
    Event,
    EventBus,
    LineSplitter,
    NodeOffline,
    StreamBroken,
    decode_event,
    events_route,
    fetch_status,
    follow_events,
    stream_events,
)
from plugshare.node.home import Home
from tests.node.conftest import init_node, start_node

CREDENTIAL = "test-credential-0123456789abcdef"

# -- a small real server: the real route on the node's HTTP server, on loopback ------------------------


def make_app(bus: EventBus, status: dict, *, heartbeat: float = 10.0, authorize=None):
    async def get_status(request):
        return JSONResponse(status)

    app = Starlette(routes=[events_route(bus, heartbeat=heartbeat, authorize=authorize),
                            Route("/status", get_status)])

    async def guarded(scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if headers.get(b"authorization") != f"Bearer {CREDENTIAL}".encode():
                refusal = JSONResponse({"error": "unauthorized", "reason": "unknown credential"},
                                       status_code=401)
                return await refusal(scope, receive, send)
        await app(scope, receive, send)

    return guarded


async def serve_app(app, *, port: int = 0, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` on 127.0.0.1 until cancelled; `task_status.started(url)`."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    sock.setblocking(False)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: http_server.serve(
            app, sock, limits=http_server.Limits(graceful=0.5),
            shutdown_trigger=trio.sleep_forever, task_status=task_status))
        task_status.started(url)


class BusServer:
    """The test server in a thread of its own (for sync tests, e.g. textual's on asyncio).
    `publish` hands events to the bus on the server's trio thread."""

    def __init__(self, status: dict | None = None, *, heartbeat: float = 10.0, port: int = 0):
        self.bus = EventBus()
        self.status = status if status is not None else {"name": "testnode"}
        self.heartbeat = heartbeat
        self.port = port
        self.url = ""
        self._started = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._thread = threading.Thread(target=lambda: trio.run(self._main), daemon=True)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._cancel:
            async with trio.open_nursery() as nursery:
                app = make_app(self.bus, self.status, heartbeat=self.heartbeat)
                self.url = await nursery.start(lambda task_status: serve_app(
                    app, port=self.port, task_status=task_status))
                self._started.set()

    def __enter__(self) -> BusServer:
        self._thread.start()
        assert self._started.wait(30), "the test server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def target(self) -> ApiTarget:
        return ApiTarget.at(self.url, CREDENTIAL, label="testnode")

    def publish(self, type: str, **kwargs) -> Event:
        return trio.from_thread.run_sync(lambda: self.bus.publish(type, **kwargs),
                                         trio_token=self._token)

    def stop(self) -> None:
        if self._thread.is_alive():
            trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
            self._thread.join(30)


# -- the wire format (pure) ---------------------------------------------------------------


def test_event_round_trips_through_its_json_line():
    event = Event(1700000000.25, "doc.written", "notes", "bob",
                  {"id": "n1", "doctype": "io.notes", "rev": "1-ab", "ünï": "ok"}, seq=12)
    line = event.to_json()
    assert "\n" not in line
    assert decode_event(line) == event
    assert decode_event(line.encode()) == event
    # a value JSON cannot hold is sent as text rather than breaking the stream
    odd = Event(1.0, "x", data={"path": Path("/tmp/a")})
    assert decode_event(odd.to_json()).data == {"path": "/tmp/a"}


@pytest.mark.parametrize("line, says", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"time": 1}', "no 'type'"),
    (b'{"type": "x", "data": [1]}', "bad 'time', 'seq' or 'data'"),
    (b'{"type": "x", "seq": "7"}', "bad 'time', 'seq' or 'data'"),
    (b'\xff\xfe', "not JSON"),
])
def test_bad_lines_are_refused_with_a_clear_reason(line, says):
    with pytest.raises(BadEvent, match=says):
        decode_event(line)


def test_line_splitter_gives_only_whole_lines():
    splitter = LineSplitter()
    assert splitter.feed(b'{"type":"a"}\n{"type"') == [b'{"type":"a"}']
    assert splitter.pending == len(b'{"type"')
    assert splitter.feed(b':"b"}\n\n') == [b'{"type":"b"}']
    assert splitter.pending == 0
    small = LineSplitter(max_line=10)
    with pytest.raises(BadEvent, match="longer than 10 bytes"):
        small.feed(b"x" * 11)


# -- the bus ------------------------------------------------------------------------------


async def test_subscribers_get_what_matches_their_filters_in_order():
    bus = EventBus()
    everything = bus.subscribe()
    notes = bus.subscribe(share="notes")
    bob_on_notes = bus.subscribe(share="notes", peer="bob")
    bus.publish("node.started")
    bus.publish("doc.written", share="notes", id="a", doctype="io.notes", rev="1-x")
    bus.publish("sync.batch_sent", share="notes", peer="bob", docs=2, bytes=300)
    bus.publish("sync.batch_sent", share="photos", peer="bob", docs=1, bytes=10)
    bus.close()
    assert [e.type async for e in everything] == [
        "node.started", "doc.written", "sync.batch_sent", "sync.batch_sent"]
    assert [(e.type, e.data.get("id")) async for e in notes] == [
        ("doc.written", "a"), ("sync.batch_sent", None)]
    got = [e async for e in bob_on_notes]
    assert [(e.share, e.peer, e.data) for e in got] == [("notes", "bob", {"docs": 2, "bytes": 300})]
    assert bus.subscribers == 0


async def test_a_slow_reader_loses_the_oldest_and_is_told_how_many():
    bus = EventBus()
    slow = bus.subscribe(max_buffer=3)
    fast = bus.subscribe(max_buffer=100)
    for i in range(10):
        bus.publish("doc.written", id=f"d{i}")  # synchronous: never waits for readers
    assert bus.dropped == 7
    first = await anext(slow)
    assert (first.type, first.data) == (DROPPED, {"count": 7})
    assert [(await anext(slow)).data["id"] for _ in range(3)] == ["d7", "d8", "d9"]
    numbered = [await anext(fast) for _ in range(10)]
    assert [(e.seq, e.data["id"]) for e in numbered] == [(i + 1, f"d{i}") for i in range(10)]
    bus.publish("doc.written", id="d10")  # nothing more was dropped: no second notice
    assert (await anext(slow)).data == {"id": "d10"}


async def test_recent_is_a_bounded_ring_with_filters():
    bus = EventBus(history=5)
    for i in range(8):
        bus.publish("doc.written", share="notes" if i % 2 else "photos", id=str(i))
    assert [e.data["id"] for e in bus.recent(100)] == ["3", "4", "5", "6", "7"]
    assert [e.data["id"] for e in bus.recent(2)] == ["6", "7"]
    assert [e.data["id"] for e in bus.recent(10, share="notes")] == ["3", "5", "7"]
    assert bus.recent(0) == []


async def test_a_reader_waits_for_the_next_event_and_closing_ends_it():
    bus = EventBus()
    got = []

    async def read():
        with bus.subscribe() as events:
            async for event in events:
                got.append(event.type)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        bus.publish("peer.connected", peer="bob", address="127.0.0.1:1", rtt_ms=0.4)
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["peer.connected"]
        bus.close()
    assert got == ["peer.connected"] and bus.subscribers == 0
    late = bus.subscribe()  # a closed bus gives subscriptions that end at once
    assert [e async for e in late] == []


def test_bad_arguments_are_clear_errors():
    bus = EventBus()
    with pytest.raises(ValueError, match="non-empty string"):
        bus.publish("")
    with pytest.raises(ValueError, match="max_buffer must be a positive integer"):
        bus.subscribe(max_buffer=0)
    with pytest.raises(ValueError, match="history must be >= 0"):
        EventBus(history=-1)


# -- GET /events over HTTP ----------------------------------------------------------------


class LineReader:
    """Reads whole NDJSON lines off one streamed response, as many as asked each time."""

    def __init__(self, response):
        self._chunks = response.aiter_bytes()
        self._splitter = LineSplitter()
        self._lines: list[dict] = []

    async def take(self, n: int) -> list[dict]:
        while len(self._lines) < n:
            chunk = await anext(self._chunks)
            self._lines += [json.loads(line) for line in self._splitter.feed(chunk)]
        taken, self._lines = self._lines[:n], self._lines[n:]
        return taken

    async def rest(self) -> list[dict]:
        """Every line until the server ends the response."""
        async for chunk in self._chunks:
            self._lines += [json.loads(line) for line in self._splitter.feed(chunk)]
        assert self._splitter.pending == 0, "the response ended mid-line"
        rest, self._lines = self._lines, []
        return rest


async def test_events_stream_starts_with_recent_then_follows_live(nursery):
    bus = EventBus()
    url = await nursery.start(serve_app, make_app(bus, {}))
    for i in range(5):
        bus.publish("doc.written", share="notes", id=f"old{i}")
    bus.publish("doc.written", share="photos", id="other")
    auth = {"authorization": f"Bearer {CREDENTIAL}"}
    async with httpx.AsyncClient() as client:
        async with client.stream("GET", f"{url}/events?recent=2&share=notes",
                                 headers=auth) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("application/x-ndjson")
            reader = LineReader(response)
            first = await reader.take(3)
            assert first[0]["type"] == HEARTBEAT
            assert [line["data"]["id"] for line in first[1:]] == ["old3", "old4"]
            bus.publish("doc.written", share="photos", id="filtered-out")
            bus.publish("sync.state", share="notes", peer="bob", state="live", done=7,
                        total=7, pending_in=0, pending_out=0)
            (live,) = await reader.take(1)
            assert live["type"] == "sync.state" and live["peer"] == "bob"
            assert live["data"] == {"state": "live", "done": 7, "total": 7, "pending_in": 0,
                                    "pending_out": 0}
        # the reader went away: its subscription goes too
        with trio.fail_after(10):
            while bus.subscribers:
                await trio.sleep(0.01)


async def test_an_idle_stream_sends_heartbeats_and_ends_when_the_bus_closes(nursery):
    bus = EventBus()
    url = await nursery.start(serve_app, make_app(bus, {}, heartbeat=0.1))
    async with httpx.AsyncClient() as client:
        async with client.stream("GET", f"{url}/events",
                                 headers={"authorization": f"Bearer {CREDENTIAL}"}) as response:
            reader = LineReader(response)
            lines = await reader.take(3)
            assert [line["type"] for line in lines] == [HEARTBEAT] * 3
            bus.close()  # the node is stopping: the stream ends at once, cleanly
            with trio.fail_after(10):
                rest = await reader.rest()
            assert all(line["type"] == HEARTBEAT for line in rest)


async def test_bad_query_and_refused_access_are_clear_http_errors(nursery):
    bus = EventBus()

    def owner_only(request):
        raise HTTPException(403, "only the owner may watch")

    url = await nursery.start(serve_app, make_app(bus, {}))
    guarded_url = await nursery.start(serve_app, make_app(bus, {}, authorize=owner_only))
    auth = {"authorization": f"Bearer {CREDENTIAL}"}
    async with httpx.AsyncClient() as client:
        bad = await client.get(f"{url}/events?recent=-3", headers=auth)
        assert bad.status_code == 400
        assert bad.json() == {"error": "bad_request",
                              "reason": "recent must be a whole number of events, got '-3'"}
        refused = await client.get(f"{guarded_url}/events", headers=auth)
        assert refused.status_code == 403
    assert bus.subscribers == 0


async def test_a_reader_that_does_not_read_never_slows_the_node(nursery):
    """The client stops reading; the node publishes far more than the socket buffers hold.
    Publishing goes on, the reader's buffer drops its oldest, and what the reader finally
    gets plus what it was told it lost is exactly what was published."""
    bus = EventBus()
    url = await nursery.start(serve_app, make_app(bus, {}))
    payload = "x" * 2000
    published = 0
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("GET", f"{url}/events",
                                 headers={"authorization": f"Bearer {CREDENTIAL}"}) as response:
            assert response.status_code == 200
            reader = LineReader(response)
            (first,) = await reader.take(1)  # the heartbeat: from here on, nothing is missed
            assert first["type"] == HEARTBEAT
            while bus.dropped == 0:
                assert published < 200_000, "the socket never filled up"
                for _ in range(500):
                    bus.publish("doc.written", id=str(published), blob=payload)
                    published += 1
                await trio.sleep(0.01)  # let the server push what the socket takes
            bus.close()
            received, dropped, ids = 0, 0, []
            for line in await reader.rest():
                event = decode_event(json.dumps(line))
                if event.type == DROPPED:
                    dropped += event.data["count"]
                elif event.type == "doc.written":
                    received += 1
                    ids.append(int(event.data["id"]))
    assert dropped == bus.dropped > 0
    assert received + dropped == published
    assert ids == sorted(ids) and ids[-1] == published - 1  # in order; the newest kept


# -- reading the stream: the client side ---------------------------------------------------


async def test_stream_events_reads_events_and_says_when_the_node_is_gone(nursery):
    bus = EventBus()
    cancel = trio.CancelScope()

    async def serve(task_status):
        with cancel:
            await serve_app(make_app(bus, {"name": "n"}), task_status=task_status)

    url = await nursery.start(serve)
    target = ApiTarget.at(url, CREDENTIAL)
    got, connected = [], []

    async def follow():
        async with httpx.AsyncClient() as client:
            with pytest.raises(StreamBroken, match="ended"):
                await stream_events(client, target, got.append, recent=0,
                                    on_connected=connected.append)

    async with trio.open_nursery() as inner:
        inner.start_soon(follow)
        with trio.fail_after(10):
            while not bus.subscribers:
                await trio.sleep(0.01)
        bus.publish("share.created", share="notes")
        with trio.fail_after(10):
            while len(got) < 2:
                await trio.sleep(0.01)
        bus.close()
    assert connected == [url]
    assert [e.type for e in got] == [HEARTBEAT, "share.created"]
    async with httpx.AsyncClient() as client:
        assert (await fetch_status(client, target)) == {"name": "n"}
        wrong = ApiTarget.at(url, "not-the-credential")
        with pytest.raises(AccessRefused, match=r"refused the credential \(HTTP 401: unknown"):
            await fetch_status(client, wrong)
        with pytest.raises(AccessRefused, match="HTTP 401"):
            await stream_events(client, wrong, got.append)
        cancel.cancel()
        await trio.sleep(0.1)
        with pytest.raises(NodeOffline, match="no node answers"):
            await fetch_status(client, target)
        with pytest.raises(NodeOffline, match="no node answers"):
            await stream_events(client, target, got.append)


async def raw_server(handler, nursery) -> str:
    """A bare TCP server that answers each connection with `handler(stream)`."""
    listeners = await nursery.start(
        lambda task_status: trio.serve_tcp(handler, 0, host="127.0.0.1", task_status=task_status))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def _read_request(stream) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(4096)


HALF_LINE = b'{"type":"doc.wri'


async def test_a_stream_cut_mid_line_is_reported_not_misread(nursery):
    async def cut_mid_line(stream):
        await _read_request(stream)
        body = b'{"type":"share.created","time":1,"share":"a"}\n' + HALF_LINE
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
                              b"transfer-encoding: chunked\r\n\r\n"
                              + f"{len(body):x}\r\n".encode() + body + b"\r\n")
        await stream.aclose()

    url = await raw_server(cut_mid_line, nursery)
    got = []
    async with httpx.AsyncClient() as client:
        with pytest.raises(StreamBroken, match=rf"cut mid-line \({len(HALF_LINE)} bytes lost"):
            await stream_events(client, ApiTarget.at(url, "c"), got.append)
    assert [(e.type, e.share) for e in got] == [("share.created", "a")]


async def test_a_silent_node_is_noticed_by_the_read_timeout(nursery):
    async def silent(stream):
        await _read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await trio.sleep_forever()

    url = await raw_server(silent, nursery)
    async with httpx.AsyncClient() as client:
        with pytest.raises(StreamBroken, match="no event or heartbeat from the node for 0.3 s"):
            await stream_events(client, ApiTarget.at(url, "c"), print, read_timeout=0.3)


async def test_following_gives_each_event_once_across_reconnections_and_restarts(nursery):
    """Events are told apart by their bus's run and sequence number, not by time: here the
    clock stands still, and a restarted node's numbering starts again."""
    first = EventBus(clock=lambda: 1000.0)
    servers: list[trio.CancelScope] = []

    async def serve(bus, port=0, *, task_status):
        with trio.CancelScope() as scope:
            servers.append(scope)
            await serve_app(make_app(bus, {}), port=port, task_status=task_status)

    url = await nursery.start(serve, first)
    port = int(url.rsplit(":", 1)[1])
    got, states = [], []

    async def until(condition):
        with trio.fail_after(20):
            while not condition():
                await trio.sleep(0.02)

    async with httpx.AsyncClient() as client, trio.open_nursery() as inner:
        inner.start_soon(lambda: follow_events(
            client, ApiTarget.at(url, CREDENTIAL), got.append,
            lambda connected, message: states.append(connected), recent=100, retry=0.05))
        await until(lambda: first.subscribers)
        for i in range(3):
            first.publish("doc.written", id=f"a{i}")  # all at the same instant
        await until(lambda: len(got) == 3)
        servers[0].cancel()  # the stream breaks; the same bus serves again, replaying all
        await until(lambda: states[-1] is False)
        first.publish("doc.written", id="a3")
        await nursery.start(serve, first, port)
        await until(lambda: len(got) == 4)
        servers[1].cancel()  # the node restarts: a new bus, numbering from 1 again
        await until(lambda: states[-1] is False)
        second = EventBus(clock=lambda: 999.0)
        second.publish("node.started")
        await nursery.start(serve, second, port)
        await until(lambda: len(got) == 5)
        inner.cancel_scope.cancel()
    assert [e.data.get("id", e.type) for e in got] == ["a0", "a1", "a2", "a3", "node.started"]
    assert [e.seq for e in got] == [1, 2, 3, 4, 1]
    assert states == [True, False, True, False, True]


def test_a_target_of_a_home_reads_run_json_each_time(tmp_path):
    not_home = ApiTarget.of_home(Home(tmp_path / "nothing"))
    with pytest.raises(NodeOffline, match="is not a plugshare home"):
        not_home.locate()
    home = tmp_path / "alice"
    init_node(home, "--name", "alice")
    target = ApiTarget.of_home(Home(home))
    assert target.label == "alice"
    with pytest.raises(NodeOffline, match="no node is running for .*plugshare run"):
        target.locate()  # the API port is 0 in node.toml: only run.json can say
    running = start_node(home)
    try:
        assert target.locate() == (running.api_url, running.credential)
    finally:
        running.stop()


# -- the real node (needs the lead's wiring: the route in api.py, doc.written published) ---


async def test_the_node_streams_doc_written_on_every_api_write(tmp_path):
    home = tmp_path / "alice"
    init_node(home, "--name", "alice")
    running = await trio.to_thread.run_sync(start_node, home)
    try:
        target = ApiTarget.of_home(Home(home))
        got: list[Event] = []
        ended: list[Exception] = []

        async def follow(client):
            try:
                await stream_events(client, target, got.append)
            except StreamBroken as exc:
                ended.append(exc)

        async def until(condition):
            with trio.fail_after(20):
                while not condition():
                    assert not ended, f"the stream ended: {ended[0]}"
                    await trio.sleep(0.02)

        async with httpx.AsyncClient() as client:
            async with trio.open_nursery() as inner:
                inner.start_soon(follow, client)
                await until(lambda: got)  # the first heartbeat: the stream is up
                put = await client.put(f"{running.api_url}/data/io.notes/n1",
                                       json={"title": "hi"},
                                       headers={"authorization": f"Bearer {running.credential}"})
                assert put.status_code == 201, put.text
                await until(lambda: any(e.type == "doc.written" for e in got))
                await trio.to_thread.run_sync(running.stop)  # the stream ends with the node
        written = next(e for e in got if e.type == "doc.written")
        assert written.data["id"] == "n1" and written.data["doctype"] == "io.notes"
        assert written.data["rev"] == put.json()["rev"]
        assert ended and isinstance(ended[0], StreamBroken)
    finally:
        running.stop()
