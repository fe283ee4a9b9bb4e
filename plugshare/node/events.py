"""The node's live events: what just happened (a document written, a peer connected, a batch
synced), published by the node's parts and streamed to `watch` over `GET /events`.

Layers, each usable alone:
- `Event` and the NDJSON wire format (`Event.to_json`, `decode_event`, `LineSplitter`): pure.
- `EventBus`: in-process fan-out on trio. Publishing is synchronous and never waits: every
  subscriber has a bounded buffer that drops its oldest event when full and tells the reader
  how many it lost, so a slow reader never slows the node.
- `events_route`: the Starlette route streaming the bus as NDJSON, with heartbeats.
- Reading the stream (`ApiTarget`, `fetch_status`, `stream_events`): what `watch`, the
  progress display and the demo use; async on either trio or asyncio (httpx, anyio).

Event types the node publishes (with their `data` keys):
    node.started; doc.written {id, doctype, rev}; peer.connected {address, rtt_ms};
    peer.disconnected {reason}; share.created; share.joined; share.revoked {member};
    share.left; share.manifest {version};
    share.join_pending {owner, reason, expires_at}; share.join_expired {owner};
    share.join_failed {reason}; share.join_cancelled; sync.batch_sent {docs, refused, bytes};
    sync.batch_received {docs, written, refused, bytes, pending, inline: the docs came with
    their offer, one round trip}; sync.doc_refused {id, reason};
    sync.conflict {id, revs};
    sync.state {state: initial|live|offline|error, done, total, pending_in, pending_out}
and, made by the bus itself: events.dropped {count}; on the wire only: heartbeat.
"""

from __future__ import annotations

import collections
import inspect
import json
import secrets
import time
from typing import Any, Callable

import attrs

from plugshare.errors import PlugshareError
from plugshare.node.home import Home

HISTORY = 200  # events kept for a newly opened view (`recent`, `?recent=N`)
HEARTBEAT_S = 10.0  # a line at least this often, so a reader notices a dead node
DROPPED = "events.dropped"
HEARTBEAT = "heartbeat"
MAX_LINE = 1024 * 1024  # a reader refuses a longer line rather than buffer without end


# -- the event and its wire form (pure) ------------------------------------------------


class StreamBroken(PlugshareError):
    """The event stream or a status answer broke: cut mid-line, malformed, timed out, or an
    unexpected HTTP error."""


class BadEvent(StreamBroken):
    """A line of the event stream is not a well-formed event."""


@attrs.frozen
class Event:
    """One thing that happened on the node. `share` is a share's name, `peer` a peer's name
    (or short node id); both are None when the event is about neither. `seq` numbers the
    events of one bus from 1 (0: not numbered, e.g. `events.dropped`), so a reader that
    reconnects can tell what it already has."""

    time: float
    type: str
    share: str | None = None
    peer: str | None = None
    data: dict[str, Any] = attrs.field(factory=dict)
    seq: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "type": self.type, "share": self.share,
                "peer": self.peer, "data": self.data}

    def to_json(self) -> str:
        """One compact JSON object (no newline). Values JSON cannot hold are written as
        text: a publisher's odd value must not break the stream for everyone."""
        return json.dumps(self.as_dict(), separators=(",", ":"), ensure_ascii=False,
                          default=str)


def decode_event(line: bytes | str) -> Event:
    """Parse one stream line. Raises `BadEvent` saying what is wrong."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadEvent(f"an event line is not JSON ({exc}): {_excerpt(line)}") from None
    if not isinstance(obj, dict):
        raise BadEvent(f"an event line is not a JSON object: {_excerpt(line)}")
    kind = obj.get("type")
    if not isinstance(kind, str) or not kind:
        raise BadEvent(f"an event line has no 'type': {_excerpt(line)}")
    when, seq = obj.get("time", 0.0), obj.get("seq", 0)
    data = obj.get("data") or {}
    if (not isinstance(when, (int, float)) or not isinstance(data, dict)
            or not isinstance(seq, int) or isinstance(seq, bool)):
        raise BadEvent(f"an event line has a bad 'time', 'seq' or 'data': {_excerpt(line)}")
    share, peer = obj.get("share"), obj.get("peer")
    return Event(float(when), kind, share if isinstance(share, str) else None,
                 peer if isinstance(peer, str) else None, data, seq)


def _excerpt(line: bytes | str) -> str:
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    return repr(text[:80] + ("…" if len(text) > 80 else ""))


class LineSplitter:
    """Splits a byte stream into complete lines. A line is only ever given out whole: what
    is left in `pending` when the stream ends was cut mid-line."""

    def __init__(self, max_line: int = MAX_LINE):
        self.max_line = max_line
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes received after the last newline."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        *lines, rest = self._buffer.split(b"\n")
        if len(rest) > self.max_line:
            raise BadEvent(f"an event line is longer than {self.max_line} bytes")
        self._buffer = bytearray(rest)
        return [bytes(line) for line in lines if line.strip()]


def matches(event: Event, share: str | None, peer: str | None) -> bool:
    """Does `event` pass the filters (None: any)?"""
    return (share is None or event.share == share) and (peer is None or event.peer == peer)


# -- the bus (trio) --------------------------------------------------------------------


class Subscription:
    """One reader's view of the bus: an async iterator of events matching its filters.

    Its buffer holds at most `max_buffer` events; when full the oldest is dropped and
    counted, and the reader gets an `events.dropped` event with the count before the next
    event. Ends (StopAsyncIteration) when closed or when the bus closes. Use it as a context
    manager (`with bus.subscribe() as events:`) so it detaches when the reader is done."""

    def __init__(self, bus: EventBus, max_buffer: int, share: str | None, peer: str | None):
        if not isinstance(max_buffer, int) or max_buffer < 1:
            raise ValueError(f"max_buffer must be a positive integer, got {max_buffer!r}")
        import trio  # the node's side only: readers of the stream need no trio

        self._trio = trio
        self.share, self.peer = share, peer
        self._bus = bus
        self._buffer: collections.deque[Event] = collections.deque()
        self._max = max_buffer
        self._unreported = 0  # dropped since the reader last heard
        self._wakeup = trio.Event()
        self.closed = False

    def _offer(self, event: Event) -> None:
        if not matches(event, self.share, self.peer):
            return
        if len(self._buffer) >= self._max:
            self._buffer.popleft()
            self._unreported += 1
            self._bus._dropped_total += 1
        self._buffer.append(event)
        self._wakeup.set()

    def close(self) -> None:
        """Detach from the bus; a reader waiting on it gets the end of the iteration."""
        if not self.closed:
            self.closed = True
            self._bus._subscriptions.discard(self)
            self._wakeup.set()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while not self._buffer:
            if self.closed:
                raise StopAsyncIteration
            self._wakeup = self._trio.Event()
            await self._wakeup.wait()
        if self._unreported:
            count, self._unreported = self._unreported, 0
            return Event(self._bus._clock(), DROPPED, data={"count": count})
        return self._buffer.popleft()


class EventBus:
    """Fan-out of the node's events to its readers (`/events`, tests).

    `publish` is synchronous and never waits: call it from the node's trio thread (from
    another thread, go through `trio.from_thread.run_sync(bus.publish, ...)`)."""

    def __init__(self, *, history: int = HISTORY, clock: Callable[[], float] = time.time):
        if history < 0:
            raise ValueError(f"history must be >= 0, got {history}")
        self._clock = clock
        self.instance = secrets.token_hex(8)  # readers tell a node restart by a new one
        self._seq = 0
        self._history: collections.deque[Event] = collections.deque(maxlen=history)
        self._subscriptions: set[Subscription] = set()
        self._dropped_total = 0
        self.closed = False

    @property
    def history_size(self) -> int:
        return self._history.maxlen or 0

    @property
    def dropped(self) -> int:
        """Events dropped for slow readers since the bus was made (for `/status`)."""
        return self._dropped_total

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def publish(self, type: str, *, share: str | None = None, peer: str | None = None,
                **data: Any) -> Event:
        """Record an event and hand it to every matching subscriber; returns it."""
        if not isinstance(type, str) or not type:
            raise ValueError(f"an event type is a non-empty string, got {type!r}")
        self._seq += 1
        event = Event(self._clock(), type, share, peer, data, self._seq)
        self._history.append(event)
        for subscription in list(self._subscriptions):
            subscription._offer(event)
        return event

    def subscribe(self, *, max_buffer: int = 1000, share: str | None = None,
                  peer: str | None = None) -> Subscription:
        """A new reader of the events published from now on that match the filters."""
        subscription = Subscription(self, max_buffer, share, peer)
        if self.closed:
            subscription.close()
        else:
            self._subscriptions.add(subscription)
        return subscription

    def recent(self, n: int, *, share: str | None = None,
               peer: str | None = None) -> list[Event]:
        """The last `n` recorded events matching the filters, oldest first."""
        if n <= 0:
            return []
        found = [e for e in self._history if matches(e, share, peer)]
        return found[-n:]

    def close(self) -> None:
        """End every subscription (the node is stopping): open streams finish at once
        instead of holding the server's graceful shutdown."""
        self.closed = True
        for subscription in list(self._subscriptions):
            subscription.close()


# -- GET /events (Starlette on trio) -----------------------------------------------------


def events_route(bus: EventBus, *, heartbeat: float = HEARTBEAT_S,
                 authorize: Callable[[Any], Any] | None = None, path: str = "/events"):
    """The route streaming `bus` as NDJSON, one event per line.

    Query: `share=NAME`, `peer=NAME` (filters), `recent=N` (first the last N matching events
    the bus remembers). A `{"type": "heartbeat", "data": {"bus": ID}}` line comes first (ID
    names this run of the bus) and then whenever `heartbeat` seconds pass without an event.
    Every event published after that first line reaches the reader, or is counted in an
    `events.dropped` if the reader falls behind. `authorize(request)`, if given, runs first
    and raises to refuse (e.g. only the owner may watch)."""
    import trio
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    async def endpoint(request: Request) -> Response:
        """GET: the node's events as newline-delimited JSON, live (owner only)"""
        if authorize is not None:
            allowed = authorize(request)
            if inspect.isawaitable(allowed):
                await allowed
        params = request.query_params
        recent_text = params.get("recent", "0")
        if not recent_text.isdigit():
            return JSONResponse(
                {"error": "bad_request",
                 "reason": f"recent must be a whole number of events, got {recent_text!r}"},
                status_code=400)
        share, peer = params.get("share") or None, params.get("peer") or None
        recent = min(int(recent_text), bus.history_size)

        async def lines():
            # Taken together, with no await between: nothing is missed or sent twice. And
            # only once the response streams, so a reader gone before leaves nothing behind.
            backlog = bus.recent(recent, share=share, peer=peer)
            with bus.subscribe(share=share, peer=peer) as subscription:
                yield _heartbeat_line(bus)
                for event in backlog:
                    yield event.to_json() + "\n"
                while True:
                    line = _heartbeat_line(bus)  # unless an event comes in time
                    with trio.move_on_after(heartbeat):
                        event = await anext(subscription, None)
                        if event is None:
                            return  # the bus closed: the node is stopping
                        line = event.to_json() + "\n"
                    yield line

        return StreamingResponse(
            lines(), media_type="application/x-ndjson",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    return Route(path, endpoint, methods=["GET"])


def _heartbeat_line(bus: EventBus) -> str:
    return json.dumps({"type": HEARTBEAT, "time": bus._clock(),
                       "data": {"bus": bus.instance}}) + "\n"


# -- reading the stream (httpx; trio or asyncio) ----------------------------------------


class NodeOffline(PlugshareError):
    """Nothing answers at the node's API address (not running, restarting, gone)."""


class AccessRefused(PlugshareError):
    """The node refused the credential (HTTP 401) or the access (403)."""


@attrs.frozen
class ApiTarget:
    """Where a node's local API is and which credential to use, looked up afresh on each
    connection: a restarted node may listen on another port (run.json says which)."""

    label: str
    locator: Callable[[], tuple[str, str]] = attrs.field(repr=False)

    @classmethod
    def of_home(cls, home: Home, label: str | None = None) -> ApiTarget:
        def locate() -> tuple[str, str]:
            return _home_api_url(home), home.owner_credential()

        return cls(label or home.root.name, locate)

    @classmethod
    def at(cls, url: str, credential: str, label: str | None = None) -> ApiTarget:
        return cls(label or url, lambda: (url.rstrip("/"), credential))

    def locate(self) -> tuple[str, str]:
        """(API base URL, bearer credential); raises `NodeOffline` when no node runs."""
        return self.locator()


def _home_api_url(home: Home) -> str:
    if not home.exists():
        raise NodeOffline(f"{home.root} is not a plugshare home; create it with "
                          "`plugshare init` (or point --home / PLUGSHARE_HOME at one)")
    runtime = home.runtime()
    if runtime and runtime.get("api"):
        return runtime["api"]
    listen = home.load_config().api.listen
    if listen.port == 0:  # a fixed port is worth trying; port 0 means "see run.json"
        raise NodeOffline(f"no node is running for {home.root}; start it with `plugshare run`")
    return f"http://{listen}"


def _offline(target: ApiTarget, url: str, exc: Exception) -> NodeOffline:
    return NodeOffline(f"no node answers for {target.label} at {url} "
                       f"({exc.__class__.__name__}); is `plugshare run` running?")


async def _refusal(response) -> PlugshareError:
    try:
        body = json.loads(await response.aread())
        reason = body.get("reason") or body.get("error") or ""
    except (ValueError, AttributeError):
        reason = ""
    status = response.status_code
    if status in (401, 403):
        what = "credential" if status == 401 else "access"
        return AccessRefused(f"the node refused the {what} (HTTP {status}: {reason or 'no reason'})")
    return StreamBroken(f"{response.request.url.copy_with(query=None)} answered HTTP {status}"
                        + (f": {reason}" if reason else ""))


async def fetch_status(client, target: ApiTarget) -> dict[str, Any]:
    """GET /status with `client` (an httpx.AsyncClient). Raises NodeOffline, AccessRefused
    or StreamBroken."""
    import httpx

    url, credential = target.locate()
    try:
        response = await client.get(f"{url}/status",
                                    headers={"authorization": f"Bearer {credential}"})
        if response.is_error:
            raise await _refusal(response)
        status = response.json()
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise _offline(target, url, exc) from None
    except (httpx.HTTPError, ValueError) as exc:
        raise StreamBroken(f"/status failed ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(status, dict):
        raise StreamBroken("/status did not answer a JSON object")
    return status


async def stream_events(client, target: ApiTarget, on_event: Callable[[Event], Any], *,
                        share: str | None = None, peer: str | None = None, recent: int = 0,
                        read_timeout: float = 2.5 * HEARTBEAT_S,
                        on_connected: Callable[[str], Any] | None = None) -> None:
    """Follow GET /events, calling `on_event` for each event (heartbeats included; `on_event`
    may return an awaitable). Returns never on its own: it raises NodeOffline,
    AccessRefused or StreamBroken when the stream cannot start or breaks (a node that
    stops ends its stream: that is StreamBroken too). `on_connected(url)` runs once the
    node has accepted the stream."""
    import httpx

    url, credential = target.locate()
    params: dict[str, Any] = {"recent": recent}
    if share:
        params["share"] = share
    if peer:
        params["peer"] = peer
    splitter = LineSplitter()
    timeout = httpx.Timeout(5.0, read=read_timeout)
    try:
        async with client.stream("GET", f"{url}/events", params=params, timeout=timeout,
                                 headers={"authorization": f"Bearer {credential}"}) as response:
            if response.is_error:
                raise await _refusal(response)
            if on_connected is not None:
                await _maybe_await(on_connected(url))
            async for chunk in response.aiter_bytes():
                for line in splitter.feed(chunk):
                    await _maybe_await(on_event(decode_event(line)))
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise _offline(target, url, exc) from None
    except httpx.ReadTimeout:
        raise StreamBroken(f"no event or heartbeat from the node for {read_timeout:g} s; "
                           "it may be stuck") from None
    except httpx.HTTPError as exc:
        raise StreamBroken(_cut(splitter, f"{exc.__class__.__name__}: {exc}")) from None
    raise StreamBroken(_cut(splitter, "the node closed the event stream"))


def _cut(splitter: LineSplitter, why: str) -> str:
    if splitter.pending:
        return f"the event stream was cut mid-line ({splitter.pending} bytes lost; {why})"
    return f"the event stream ended ({why})"


async def _maybe_await(result: Any) -> None:
    if inspect.isawaitable(result):
        await result


async def follow_events(client, target: ApiTarget, on_event: Callable[[Event], Any],
                        on_state: Callable[[bool, str], Any], *, share: str | None = None,
                        peer: str | None = None, recent: int = 0, retry: float = 1.0,
                        refused_retry: float = 5.0, give_up_when_refused: bool = False,
                        read_timeout: float = 2.5 * HEARTBEAT_S) -> None:
    """Follow a node's events until cancelled, reconnecting after every break (the node
    restarting, a cut stream). `on_event` gets each event once: heartbeats are left out and
    what a reconnection replays (`recent`) is not given twice. `on_state(connected,
    message)` runs when the connection changes: connected, or why not (offline, refused,
    cut), not again for the same kind of trouble. A refused credential is retried every
    `refused_retry` s, or raised (`AccessRefused`) with `give_up_when_refused`."""
    import anyio

    bus, last_seq = None, 0  # what was given: events up to last_seq of that bus
    reported: tuple[bool, type | None] | None = None

    async def state(connected: bool, kind: type | None, message: str) -> None:
        nonlocal reported
        if reported != (connected, kind):
            reported = (connected, kind)
            await _maybe_await(on_state(connected, message))

    async def deliver(event: Event) -> None:
        nonlocal bus, last_seq
        if event.type == HEARTBEAT:
            if event.data.get("bus") != bus:  # a stream's first line; a new run: all is new
                bus, last_seq = event.data.get("bus"), 0
            return
        if event.seq:
            if event.seq <= last_seq:
                return  # already given before the reconnection
            last_seq = event.seq
        await _maybe_await(on_event(event))

    while True:
        try:
            await stream_events(client, target, deliver, share=share, peer=peer, recent=recent,
                                read_timeout=read_timeout,
                                on_connected=lambda url: state(True, None, f"connected to {url}"))
        except AccessRefused as exc:
            if give_up_when_refused:
                raise
            await state(False, AccessRefused, str(exc))
            await anyio.sleep(refused_retry)
            continue
        except PlugshareError as exc:  # offline, cut, malformed: all worth another try
            await state(False, type(exc), str(exc))
        await anyio.sleep(retry)
