"""`plugshare watch`: a live view of running nodes — peers, shares and their sync state, and
the node's events as they happen.

The full-screen view is a textual app (on asyncio; it talks to the node over HTTP only:
`/status` polled every second, `/events` followed). `--plain` (or any output that is not a
terminal) prints one line per event instead, for logs and pipes. Both survive the node
restarting: they say so and reconnect by themselves.

The formatting helpers at the top are pure and tolerate missing keys, so an older or newer
node's `/status` still shows what it has.
"""

from __future__ import annotations

import collections
import datetime
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, TextIO

import attrs
import click
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Footer, Input, RichLog, Static, TabbedContent, TabPane

from plugshare.errors import PlugshareError
from plugshare.node.events import (
    DROPPED,
    AccessRefused,
    ApiTarget,
    Event,
    fetch_status,
    follow_events,
)
from plugshare.node.progress import fmt_bytes

POLL_S = 1.0  # /status refresh
RETRY_S = 1.0  # reconnecting to a node that went away
REFUSED_RETRY_S = 5.0  # a refused credential: retry, but gently (each try is audited)
RECENT = 50  # events asked for when the view opens
LOG_KEPT = 2000  # events kept for re-filtering the log
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the terminal closed
MIN_WIDTH, MIN_HEIGHT = 60, 16

# -- pure formatting ----------------------------------------------------------------------


def _get(mapping: Any, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """`mapping[key]` if `mapping` is a dict and the value has the expected type (a bool
    is not taken for a number), else `default`."""
    if isinstance(mapping, dict):
        value = mapping.get(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool)):
            return value
    return default


_NUMBER = (int, float)


def short_id(node_id: str | None) -> str:
    """The first group of a node id: enough to tell peers apart at a glance."""
    if not node_id:
        return "—"
    return node_id.split("-", 1)[0] + ("…" if "-" in node_id else "")


def ago(when: float | None, now: float) -> str:
    if when is None:
        return "—"
    seconds = max(0.0, now - when)
    if seconds < 1:
        return "now"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "—"
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def fmt_duration(seconds: float) -> str:
    """`45s`, `3m05s`, `2h07m`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_text(done: int, total: int | None, width: int = 10, *, size: int = 0,
                  rate: Rate | None = None) -> str:
    """An initial sync's progress as a bar: `▰▰▰▰▱▱▱▱▱▱ 40% 400/1000`, then what is known of
    `size` (bytes moved) and `rate`: ` 98.6 kB 24.1 kB/s ETA 25s`."""
    if not total:
        text = f"initial {done} docs"
    else:
        fraction = min(1.0, max(0.0, done / total))
        filled = math.floor(fraction * width)
        text = f"{'▰' * filled}{'▱' * (width - filled)} {fraction:.0%} {done}/{total}"
    if size:
        text += f" {fmt_bytes(size)}"
    if rate is not None and rate.bytes > 0:
        text += f" {fmt_bytes(rate.bytes)}/s"
    if rate is not None and rate.docs > 0 and total and total > done:
        text += f" ETA {fmt_duration((total - done) / rate.docs)}"
    return text


@attrs.frozen
class Rate:
    """How fast an initial sync goes, per second."""

    docs: float
    bytes: float


@attrs.define
class SyncRates:
    """The rate of each link's initial sync, averaged since the view first saw it in that
    state (pure: fed the successive `/status` answers)."""

    _first: dict[tuple[str, str], tuple[float, int, int]] = attrs.field(factory=dict)
    _rates: dict[tuple[str, str], Rate] = attrs.field(factory=dict)

    def observe(self, status: dict[str, Any], now: float) -> None:
        seen = set()
        for share in _get(status, "shares", list, []):
            name = _get(share, "name", str) or _get(share, "id", str, "?")
            for link in _get(share, "peers", list, []):
                if _get(link, "state", str) != "initial":
                    continue
                key = (name, _get(link, "peer", str, "?"))
                seen.add(key)
                done, size = _link_done(link), _get(link, "bytes", int, 0)
                first = self._first.get(key)
                if first is None or done < first[1]:  # new, or restarted: measure afresh
                    self._first[key] = (now, done, size)
                    self._rates.pop(key, None)
                elif now > first[0]:
                    elapsed = now - first[0]
                    self._rates[key] = Rate((done - first[1]) / elapsed,
                                            max(0, size - first[2]) / elapsed)
        for key in set(self._first) - seen:
            del self._first[key]
            self._rates.pop(key, None)

    def get(self, share: str, peer: str) -> Rate | None:
        return self._rates.get((share, peer))


def details(data: dict[str, Any]) -> str:
    """`key=value` pairs; strings plain when they read unambiguously."""
    parts = []
    for key, value in data.items():
        if value is None:  # unknown: saying "null" tells nothing
            continue
        if isinstance(value, str) and value and not any(c.isspace() or c in "\"=" for c in value):
            text = value
        else:
            text = json.dumps(value, ensure_ascii=False, default=str)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def event_line(event: Event, *, date: bool = False) -> str:
    """One event as a line: time, type, share, peer, details."""
    when = datetime.datetime.fromtimestamp(event.time)
    stamp = when.isoformat(timespec="milliseconds") if date else when.strftime("%H:%M:%S")
    return (f"{stamp} {event.type:<19} {event.share or '-':<10} {event.peer or '-':<10} "
            f"{details(event.data)}").rstrip()


def notice_line(message: str, *, label: str | None = None, date: bool = False) -> str:
    now = datetime.datetime.now()
    stamp = now.isoformat(timespec="milliseconds") if date else now.strftime("%H:%M:%S")
    return f"{stamp} -- {label + ': ' if label else ''}{message}"


def summary_text(status: dict[str, Any]) -> str:
    """The node in one line, what changes first (a narrow terminal cuts the end): name, id,
    store, dropped events, then the API and peer addresses."""
    parts = [_get(status, "name", str, "?"), short_id(_get(status, "node_id", str))]
    store = _get(status, "store", dict, {})
    if store:
        bits = [_get(store, "backend", str, "store")]
        if (count := _get(store, "doc_count", int)) is not None:
            bits.append(f"{count} doc{'' if count == 1 else 's'}")
        if _get(store, "error", str):
            bits.append("failing")  # why: in /status store.error and the shares' sync state
        if (seq := _get(store, "update_seq", (int, str))) is not None:
            bits.append(f"seq {seq}")
        parts.append(" · ".join(bits))
    if dropped := _get(status, "events_dropped", int):
        parts.append(f"{dropped} events dropped")
    if api := _get(status, "api", str):
        parts.append(f"api {api}")
    if peer_address := _get(status, "peer_address", str):
        parts.append(f"peers at {peer_address}")
    return "  ".join(parts)


def peer_rows(status: dict[str, Any], now: float) -> list[tuple[str, ...]]:
    """Rows of the peers table: name, short id, address, connected (yes, or relay when the
    link runs through a relay), RTT, last seen."""
    rows = []
    for peer in _get(status, "peers", list, []):
        addresses = [a for a in _get(peer, "addresses", list, []) if isinstance(a, str)]
        connected = _get(peer, "connected", bool)
        rows.append((
            _get(peer, "name", str, "?"),
            short_id(_get(peer, "id", str)),
            addresses[0] + (f" +{len(addresses) - 1}" if len(addresses) > 1 else "")
            if addresses else "—",
            ("● relay" if _get(peer, "via", str) == "relay" else "● yes") if connected
            else ("○ no" if connected is False else "?"),
            fmt_ms(_get(peer, "rtt_ms", _NUMBER)),
            ago(_get(peer, "last_seen", _NUMBER), now),
        ))
    return rows


SHARE_COLUMNS = ("Share", "Peer", "Role", "Access", "Members", "Docs", "Pending in",
                 "Pending out", "Lag", "Last sync", "State")
PEER_COLUMNS = ("Peer", "Id", "Address", "Connected", "RTT", "Last seen")
# Which columns stay when the terminal is narrow, most needed first (indexes into the above).
SHARE_PRIORITY = (0, 1, 10, 5, 6, 7, 2, 3, 9, 8, 4)
PEER_PRIORITY = (0, 3, 4, 5, 2, 1)
CELL_PADDING = 2  # a DataTable cell's padding, one space each side
UNKNOWN = "? unknown"  # a cell whose value went stale with the node


def fit_columns(columns: tuple[str, ...], rows: list[tuple[str, ...]], width: int,
                priority: tuple[int, ...]) -> list[int]:
    """The columns (indexes, in table order) that fit in `width` cells, taken by
    `priority`: a narrow terminal loses the least needed columns rather than the last."""
    def need(i: int) -> int:
        return max([len(columns[i]), *(len(str(row[i])) for row in rows)]) + CELL_PADDING

    chosen, used = [], 0
    for i in priority:
        if used + need(i) <= width or not chosen:
            chosen.append(i)
            used += need(i)
    return sorted(chosen)


def stale_rows(rows: list[tuple[str, ...]], columns: tuple[str, ...],
               stale: tuple[str, ...]) -> list[tuple[str, ...]]:
    """`rows` with the cells of the `stale` columns replaced by UNKNOWN (non-empty ones)."""
    indexes = {columns.index(name) for name in stale}
    return [tuple(UNKNOWN if i in indexes and cell and cell != "—" else cell
                  for i, cell in enumerate(row)) for row in rows]


def share_rows(status: dict[str, Any], now: float,
               rates: SyncRates | None = None) -> list[tuple[str, ...]]:
    """Rows of the shares table: one per (share, peer), or one for a share with no peer;
    `rates` adds speed and ETA to the initial syncs."""
    rows = []
    for share in _get(status, "shares", list, []):
        name = _get(share, "name", str) or _get(share, "id", str, "?")
        permission = _get(share, "permission", str)
        access = {"read": "read-only", "write": "read-write"}.get(permission, permission or "?")
        members, docs = _member_count(share), _get(share, "docs", int)
        common = (_get(share, "role", str, "?"), access,
                  "?" if members is None else str(members), "?" if docs is None else str(docs))
        ended = _get(share, "status", str) if share.get("status") in ("revoked", "left") else None
        peers = [p for p in _get(share, "peers", list, []) if isinstance(p, dict)]
        if not peers:
            rows.append((name, "—", *common, "—", "—", "—", "—", ended or "no peer yet"))
            continue
        for i, link in enumerate(peers):
            rows.append((
                name if i == 0 else "",
                _get(link, "peer", str, "?"),
                *common,
                str(_get(link, "pending_in", int, "—")),
                str(_get(link, "pending_out", int, "—")),
                fmt_ms(_get(link, "lag_ms", _NUMBER)),
                ago(_get(link, "last_sync", _NUMBER), now),
                ended or link_state(link, rates.get(name, _get(link, "peer", str, "?"))
                                    if rates is not None else None),
            ))
    for join in _get(status, "pending_joins", list, []):  # waiting for an offline owner
        if isinstance(join, dict):
            rows.append((_get(join, "share", str, "?"), "—", "member", "—", "—", "—", "—",
                         "—", "—", "—", _get(join, "state", str, "pending")))
    return rows


def _member_count(share: dict[str, Any]) -> int | None:
    """`members` as a count, or as the list of members (counting the active ones)."""
    members = share.get("members")
    if isinstance(members, list):
        return sum(1 for m in members
                   if not isinstance(m, dict) or m.get("status", "active") == "active")
    return _get(share, "members", int)


def _link_done(link: dict[str, Any]) -> int:
    done = _get(link, "done", int)
    if done is None:  # a node that counts each direction apart
        done = _get(link, "sent", int, 0) + _get(link, "received", int, 0)
    return done


def link_state(link: dict[str, Any], rate: Rate | None = None) -> str:
    state = _get(link, "state", str, "?")
    if state == "initial":
        return progress_text(_link_done(link), _get(link, "total", int),
                             size=_get(link, "bytes", int, 0), rate=rate)
    if state == "error" and (why := _get(link, "error", str)):
        return f"✖ error: {why[:40]}" + ("…" if len(why) > 40 else "")
    if state == "retrying":
        retry_in = _get(link, "retry_in", _NUMBER)
        why = _get(link, "error", str, "")
        return (f"↻ retrying{f' in {retry_in:.0f} s' if retry_in is not None else ''}"
                + (f": {why[:40]}" + ("…" if len(why) > 40 else "") if why else ""))
    return {"live": "● live", "offline": "○ offline", "error": "✖ error"}.get(state, state)


def _styled_state(cell: str) -> Text:
    if cell.startswith("●"):
        style = "green"
    elif cell.startswith("✖"):
        style = "bold red"
    elif cell.startswith(("▰", "▱", "initial", "↻")):
        style = "yellow"
    elif cell.startswith("○") or cell in ("revoked", "left", UNKNOWN):
        style = "dim"
    else:
        style = ""
    return Text(cell, style=style)


_EVENT_STYLES = {
    "doc.written": "cyan", "events.dropped": "bold magenta", "sync.doc_refused": "red",
    "sync.conflict": "yellow", "peer.disconnected": "yellow", "peer.connected": "green",
    "share.revoked": "red", "sync.state": "green",
}


def event_text(event: Event) -> Text:
    style = _EVENT_STYLES.get(event.type, "")
    if event.type == "sync.state" and event.data.get("state") == "error":
        style = "bold red"
    elif event.type == "sync.state" and event.data.get("state") == "retrying":
        style = "yellow"
    return Text(event_line(event), style=style)


@attrs.frozen
class LogFilter:
    """What the event log shows: `share:NAME`, `peer:NAME`, or a word found in either."""

    share: str | None = None
    peer: str | None = None
    word: str | None = None

    @classmethod
    def parse(cls, text: str) -> LogFilter:
        share = peer = word = None
        for token in text.split():
            key, sep, value = token.partition(":")
            if sep and key == "share" and value:
                share = value
            elif sep and key == "peer" and value:
                peer = value
            else:
                word = token.lower()
        return cls(share, peer, word)

    def __bool__(self) -> bool:
        return bool(self.share or self.peer or self.word)

    def __str__(self) -> str:
        return " ".join(x for x in (self.share and f"share:{self.share}",
                                    self.peer and f"peer:{self.peer}", self.word) if x)

    def matches(self, event: Event) -> bool:
        if event.type == DROPPED:
            return True  # losing events is news whatever the filter
        if self.share and event.share != self.share:
            return False
        if self.peer and event.peer != self.peer:
            return False
        if self.word:
            return any(self.word in (x or "").lower() for x in (event.share, event.peer))
        return True


# -- the full-screen view (textual, asyncio) -----------------------------------------------


class NodeView(Vertical):
    """One node: summary, offline banner, peers, shares, event log. Polls `/status` and
    follows `/events` on its own; survives the node going away and coming back."""

    DEFAULT_CSS = """
    NodeView { height: 1fr; }
    NodeView .summary { height: 1; padding: 0 1; background: $boost; text-style: bold;
                        text-wrap: nowrap; text-overflow: ellipsis; }
    NodeView .banner { display: none; height: auto; padding: 0 1; background: $error;
                       color: $text; text-style: bold; }
    NodeView .banner.shown { display: block; }
    NodeView .title { height: 1; padding: 0 1; color: $accent; text-style: bold; }
    NodeView DataTable { height: auto; max-height: 9; overflow-x: hidden; }
    NodeView RichLog { height: 1fr; min-height: 3; border: round $primary; padding: 0 1;
                       overflow-x: hidden; scrollbar-gutter: stable; }
    """

    def __init__(self, target: ApiTarget, *, poll: float = POLL_S, retry: float = RETRY_S,
                 recent: int = RECENT, log_filter: LogFilter = LogFilter()):
        super().__init__()
        self.target = target
        self.poll, self.retry, self.recent = poll, retry, recent
        self.status: dict[str, Any] | None = None
        self.trouble: str | None = None  # why /status does not answer, shown in the banner
        self.log_filter = log_filter
        self.paused = False
        self._held = 0  # matching events that came in while paused
        self._events: collections.deque[Event] = collections.deque(maxlen=LOG_KEPT)
        self._rates = SyncRates()
        self._client = None

    def compose(self) -> ComposeResult:
        yield Static(f"{self.target.label}: connecting…", classes="summary")
        yield Static("", classes="banner")
        yield Static("Peers", classes="title")
        yield DataTable(classes="peers", cursor_type="none", zebra_stripes=True)
        yield Static("Shares", classes="title")
        yield DataTable(classes="shares", cursor_type="none", zebra_stripes=True)
        # Wrapped at word boundaries to the log's own width (min_width's default, 78, would
        # wrap wider than an 80-column terminal leaves and cut the ends off).
        yield RichLog(classes="log", max_lines=LOG_KEPT, wrap=True, min_width=1)

    def on_mount(self) -> None:
        import httpx

        self._retitle()
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(5.0))
        self.run_worker(self._poll_status(), exit_on_error=False, group="poll")
        self.run_worker(self._follow(), exit_on_error=False, group="events")

    async def on_unmount(self) -> None:
        self.workers.cancel_all()
        if self._client is not None:
            await self._client.aclose()

    # -- the node's state ---------------------------------------------------------------

    async def _poll_status(self) -> None:
        import asyncio

        while True:
            wait = self.poll
            try:
                status = await fetch_status(self._client, self.target)
            except AccessRefused as exc:
                self._show_trouble(f"✖ {exc} — check the owner credential of "
                                   f"{self.target.label}; retrying")
                wait = max(self.poll, REFUSED_RETRY_S)
            except PlugshareError as exc:
                self._show_trouble(f"● node offline — retrying ({exc})")
                wait = max(self.poll, self.retry)
            else:
                self._show_status(status)
            await asyncio.sleep(wait)

    def _show_trouble(self, message: str) -> None:
        self.trouble = message
        banner = self.query_one(".banner", Static)
        banner.update(message)
        banner.add_class("shown")
        self._fill_tables()  # what was known stays, but not "connected" nor "live"

    def _show_status(self, status: dict[str, Any]) -> None:
        self.status, self.trouble = status, None
        self.query_one(".banner", Static).remove_class("shown")
        self.query_one(".summary", Static).update(summary_text(status))
        self._rates.observe(status, time.time())
        self._fill_tables()

    def on_resize(self, event) -> None:
        self._fill_tables()

    def _fill_tables(self) -> None:
        if self.status is None:
            return
        now, stale = time.time(), self.trouble is not None
        peers = peer_rows(self.status, now)
        shares = share_rows(self.status, now, self._rates)
        if stale:
            peers = stale_rows(peers, PEER_COLUMNS, ("Connected", "RTT"))
            shares = stale_rows(shares, SHARE_COLUMNS, ("Pending in", "Pending out", "Lag",
                                                        "State"))
        self._fill(self.query_one(".peers", DataTable), PEER_COLUMNS, PEER_PRIORITY, peers,
                   styled=PEER_COLUMNS.index("Connected"))
        self._fill(self.query_one(".shares", DataTable), SHARE_COLUMNS, SHARE_PRIORITY,
                   shares, styled=SHARE_COLUMNS.index("State"))

    def _fill(self, table: DataTable, columns: tuple[str, ...], priority: tuple[int, ...],
              rows: list[tuple[str, ...]], styled: int) -> None:
        """Rows into `table`, with the columns that fit the view's width (a scrollbar
        would hide the rightmost ones, State among them, behind stray glyphs)."""
        width = self.size.width or 80
        shown = fit_columns(columns, rows, width - 2, priority)
        if [str(c.label) for c in table.columns.values()] != [columns[i] for i in shown]:
            table.clear(columns=True)
            table.add_columns(*(columns[i] for i in shown))
        else:
            table.clear()
        for row in rows:
            table.add_row(*(_styled_state(row[i]) if i == styled else row[i] for i in shown))

    # -- the event log ----------------------------------------------------------------------

    async def _follow(self) -> None:
        await follow_events(self._client, self.target, self._on_event, self._on_stream_state,
                            recent=self.recent, retry=self.retry,
                            refused_retry=REFUSED_RETRY_S)

    def _on_stream_state(self, connected: bool, message: str) -> None:
        self._write(
            Text(notice_line(("event stream " if connected else "event stream: ") + message),
                 style="dim" if connected else "yellow"))

    def _on_event(self, event: Event) -> None:
        self._events.append(event)
        if not self.log_filter.matches(event):
            return
        if self.paused:
            self._held += 1
            self._retitle()
        else:
            self._write(event_text(event))

    def set_paused(self, paused: bool) -> None:
        if self.paused and not paused and self._held:
            held = [e for e in self._events if self.log_filter.matches(e)][-self._held:]
            for event in held:
                self._write(event_text(event))
        self.paused, self._held = paused, 0
        self._retitle()

    def set_filter(self, log_filter: LogFilter) -> None:
        """Show only the matching events, the ones already received included."""
        self.log_filter = log_filter
        self._held = 0
        self.query_one(".log", RichLog).clear()
        for event in self._events:
            if log_filter.matches(event):
                self._write(event_text(event))
        self._retitle()

    def _write(self, text: Text) -> None:
        """A line into the log, wrapped to the log's width (measured against the app's
        console otherwise, which is not the widget's width)."""
        log = self.query_one(".log", RichLog)
        log.write(text, width=log.scrollable_content_region.width or None)

    def _retitle(self) -> None:
        title = "Events"
        if self.log_filter:
            title += f" — filter: {self.log_filter}"
        if self.paused:
            title += f" — PAUSED ({self._held} new)"
        self.query_one(".log", RichLog).border_title = title


class WatchApp(App):
    """`plugshare watch`: one tab per node (no tabs for a single node)."""

    TITLE = "plugshare watch"
    ENABLE_COMMAND_PALETTE = False  # nothing to offer there; its footer entry took room
    AUTO_FOCUS = None  # the keys belong to the app until the filter box opens
    CSS = """
    #too-small { display: none; width: 1fr; height: 1fr; content-align: center middle;
                 text-style: bold; }
    Screen.too-small #too-small { display: block; }
    Screen.too-small #main { display: none; }
    """
    BINDINGS = [
        Binding("p", "toggle_pause", "Pause log"),
        Binding("f", "filter", "Filter log"),
        Binding("q", "quit", "Quit"),
        Binding("tab", "next_node", "Next node", priority=True),
        *(Binding(str(n), f"show_node({n - 1})", f"Node {n}", show=False) for n in range(1, 10)),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("escape", "close_filter", "Close filter", show=False),
    ]

    def __init__(self, targets: list[ApiTarget], *, poll: float = POLL_S,
                 retry: float = RETRY_S, recent: int = RECENT,
                 log_filter: LogFilter = LogFilter(), handle_signals: bool = False,
                 stop_requested: Callable[[], bool] = lambda: False,
                 on_stop_signal: Callable[[], None] = lambda: None):
        super().__init__()
        if not targets:
            raise ValueError("watch needs at least one node")
        self.targets = targets
        self._view_options = dict(poll=poll, retry=retry, recent=recent, log_filter=log_filter)
        self._handle_signals = handle_signals
        self._stop_requested = stop_requested
        self._on_stop_signal = on_stop_signal
        self.paused = False

    def compose(self) -> ComposeResult:
        if len(self.targets) == 1:
            with Vertical(id="main"):
                yield NodeView(self.targets[0], **self._view_options)
        else:
            with TabbedContent(id="main"):
                for i, target in enumerate(self.targets):
                    with TabPane(target.label, id=f"node-{i}"):
                        yield NodeView(target, **self._view_options)
        yield Static("", id="too-small")
        yield Footer()

    def on_mount(self) -> None:
        self._check_size()
        if self._handle_signals:  # SIGTERM, SIGHUP (or a SIGINT from outside): leave cleanly
            import asyncio

            loop = asyncio.get_running_loop()
            for signum in STOP_SIGNALS:
                loop.add_signal_handler(signum, self._stop_signal)
            if self._stop_requested():  # a signal came before these handlers were in place
                self.exit()

    def _stop_signal(self) -> None:
        self._on_stop_signal()
        self.exit()

    def on_resize(self, event) -> None:
        self._check_size(event.size)  # self.size catches up only after this event

    def _check_size(self, size=None) -> None:
        width, height = size or self.size
        small = width < MIN_WIDTH or height < MIN_HEIGHT
        self.screen.set_class(small, "too-small")
        if small:
            self.query_one("#too-small", Static).update(
                f"The terminal is too small ({width}×{height}); watch needs at least "
                f"{MIN_WIDTH}×{MIN_HEIGHT}.\nEnlarge it, or use `plugshare watch --plain`. "
                "(q quits)")

    @property
    def views(self) -> list[NodeView]:
        return list(self.query(NodeView))

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action in ("next_node", "show_node") and len(self.targets) < 2:
            return False  # one node: no tabs (and Tab keeps its usual meaning)
        return True

    def action_next_node(self) -> None:
        tabs = self.query_one(TabbedContent)
        current = int((tabs.active or "node-0").removeprefix("node-"))
        tabs.active = f"node-{(current + 1) % len(self.targets)}"

    def action_show_node(self, index: int) -> None:
        if index < len(self.targets):
            self.query_one(TabbedContent).active = f"node-{index}"

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        for view in self.views:
            view.set_paused(self.paused)

    async def action_filter(self) -> None:
        """Open the filter box (mounted only while open, so it never holds the keys)."""
        if self.query("#filter"):
            return
        box = Input(value=str(self.views[0].log_filter), id="filter",
                    placeholder="share:NAME  peer:NAME  or a word; empty shows all "
                                "(Enter applies, Esc closes)")
        await self.mount(box, before=self.query_one(Footer))
        box.focus()

    async def action_close_filter(self) -> None:
        for box in self.query("#filter"):
            await box.remove()
        self.set_focus(None)

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        log_filter = LogFilter.parse(event.value)
        for view in self.views:
            view.set_filter(log_filter)
        await self.action_close_filter()


# -- plain lines (trio) ---------------------------------------------------------------------


def run_plain(targets: list[ApiTarget], out: TextIO, *, as_json: bool = False,
              share: str | None = None, peer: str | None = None, recent: int = 0,
              retry: float = RETRY_S,
              stop_requested: Callable[[], bool] = lambda: False) -> None:
    """Print events as lines until Ctrl-C/SIGTERM (then return): one line per event, and a
    notice line when a node goes away or comes back. With `as_json` each event is its
    NDJSON line and notices go to stderr. Raises AccessRefused when a node refuses the
    credential: retrying would not help a script."""
    import functools

    import trio

    trio.run(functools.partial(follow_plain, targets, out, as_json=as_json, share=share,
                               peer=peer, recent=recent, retry=retry,
                               stop_requested=stop_requested))


async def follow_plain(targets: list[ApiTarget], out: TextIO, *, as_json: bool = False,
                       share: str | None = None, peer: str | None = None, recent: int = 0,
                       retry: float = RETRY_S,
                       stop_requested: Callable[[], bool] = lambda: False) -> None:
    """`run_plain`'s work, on trio: returns on SIGINT/SIGTERM/SIGHUP or when cancelled, or
    at once if `stop_requested()` (a signal the caller took before this one listened)."""
    import httpx
    import trio

    refused: list[AccessRefused] = []
    labels = len(targets) > 1

    def write(line: str, stream: TextIO) -> None:
        try:
            stream.write(line + "\n")
            stream.flush()
        except BrokenPipeError:  # `watch --plain | head`: the reader is done, so are we
            _silence_stdout()
            nursery.cancel_scope.cancel()

    async def follow_one(target: ApiTarget, client) -> None:
        prefix = f"[{target.label}] " if labels else ""

        def on_event(event: Event) -> None:
            if as_json:
                write(event.to_json(), out)
            else:
                write(prefix + event_line(event, date=True), out)

        def on_state(connected: bool, message: str) -> None:
            if not connected:
                message = f"{message}; retrying every {retry:g} s"
            write(notice_line(message, label=target.label, date=True),
                  sys.stderr if as_json else out)

        try:
            await follow_events(client, target, on_event, on_state, share=share, peer=peer,
                                recent=recent, retry=retry, give_up_when_refused=True)
        except AccessRefused as exc:
            refused.append(AccessRefused(f"{target.label}: {exc}"))
            nursery.cancel_scope.cancel()

    async def stop_on_signal() -> None:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            if stop_requested():
                nursery.cancel_scope.cancel()
            async for _ in signals:
                nursery.cancel_scope.cancel()

    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0)) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_signal)
            for target in targets:
                nursery.start_soon(follow_one, target, client)
    if refused:
        raise refused[0]


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush does
    not fail noisily."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# -- the command -------------------------------------------------------------------------


def open_watch(targets: list[ApiTarget], *, plain: bool, as_json: bool = False,
               share: str | None = None, peer: str | None = None, recent: int = 20,
               stop_requested: Callable[[], bool] = lambda: False,
               on_stop_signal: Callable[[], None] = lambda: None) -> None:
    """Run the full-screen view, or plain lines when asked or when stdout is no terminal;
    until a stop signal, or at once if `stop_requested()` once the view listens for them."""
    if plain or as_json or not sys.stdout.isatty():
        try:
            run_plain(targets, sys.stdout, as_json=as_json, share=share, peer=peer,
                      recent=recent, stop_requested=stop_requested)
        except* KeyboardInterrupt:  # Ctrl-C before the signal handler was in place
            pass
        return
    WatchApp(targets, recent=recent, log_filter=LogFilter(share, peer),
             handle_signals=True, stop_requested=stop_requested,
             on_stop_signal=on_stop_signal).run()


@click.command()
@click.option("--plain", is_flag=True,
              help="Print events as lines (for logs and pipes) instead of the full-screen view.")
@click.option("--share", help="Only events of this share.")
@click.option("--peer", help="Only events about this peer.")
@click.option("--recent", default=20, show_default=True, type=click.IntRange(0, 200),
              help="Start with the last N events the node remembers.")
@click.pass_obj
def watch(ctx, plain: bool, share: str | None, peer: str | None, recent: int) -> None:
    """Live view of the node: peers, shares, sync state, lag and events (q quits).

    With --plain (or when stdout is not a terminal): one line per event; with --json: the
    events as NDJSON. Both keep going when the node restarts."""
    if not ctx.home.exists():
        raise PlugshareError(f"{ctx.home.root} is not a plugshare home; create it with "
                             "`plugshare init` (or point --home / PLUGSHARE_HOME at one)")
    open_watch([ApiTarget.of_home(ctx.home)], plain=plain, as_json=ctx.as_json, share=share,
               peer=peer, recent=recent)
