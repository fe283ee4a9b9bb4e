"""Showing a share's initial sync until it is live (`share accept`, or any initial sync).

The node says how the sync goes in two ways, and both are followed: its event stream
(`sync.state`, `sync.batch_*` for the share: quick) and `/status` polled every second (the
state as it is now: covers what happened before the stream opened, or a node without
`/events`). `SyncTracker` is the pure part that folds both into one picture.

On a terminal: a rich progress bar: docs done, and once the sending peer has said how many
changes are still coming (`total`), a percentage and an ETA; bytes moved and their rate once
batches report them. Anywhere else: nothing while it runs, one summary line at the end (docs
and bytes).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any, TextIO

import attrs
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from plugshare.errors import PlugshareError
from plugshare.node.events import HISTORY, ApiTarget, Event, fetch_status, follow_events
from plugshare.node.home import Home

POLL_S = 1.0
STALL_TIMEOUT_S = 60.0  # give up showing when nothing moves for this long


@attrs.frozen
class SyncSummary:
    """How far the sync got while it was followed."""

    share: str
    live: bool
    state: str | None  # the last state heard ("initial", "live", "retrying", "offline", "error")
    done: int  # documents done, as the node counts them
    total: int | None
    docs: int  # documents received in batches while followed
    bytes: int  # bytes of documents moved (both ways)
    seconds: float
    reason: str  # why following ended: "live", "timeout", "stalled", "interrupted"

    def line(self) -> str:
        """One line for a log or a non-terminal."""
        moved = f"{self.done} docs" + (f", {fmt_bytes(self.bytes)}" if self.bytes else "")
        if self.live:
            return f"{self.share}: initial sync done — {moved} in {self.seconds:.1f} s; live"
        progress = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        progress += " docs" + (f", {fmt_bytes(self.bytes)}" if self.bytes else "")
        why = {"timeout": f"not live after {self.seconds:.0f} s",
               "stalled": f"no progress for a while ({self.seconds:.0f} s in)",
               "interrupted": "stopped watching"}.get(self.reason, self.reason)
        return (f"{self.share}: {why} (state {self.state or 'unknown'}, {progress}); the "
                "sync goes on in the background — `plugshare watch` shows it")


def fmt_bytes(n: float) -> str:
    """A byte count for people: 512 B, 45.1 kB, 3.2 MB."""
    for unit in ("B", "kB", "MB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


@attrs.define
class SyncTracker:
    """The sync of one share as events and status answers tell it (pure)."""

    share: str
    started: float = attrs.field(factory=time.monotonic)
    links: dict[str, dict[str, Any]] = attrs.field(factory=dict)  # peer -> state, done, total, bytes
    docs: int = 0
    event_bytes: int = 0  # bytes the batch events told of while followed
    # When and at how many bytes the first news came: the rate counts from there, so bytes
    # moved before the following began do not inflate it.
    bytes_base: tuple[float, int] | None = None
    last_progress: float = attrs.field(factory=time.monotonic)
    # Sticky: a /status answer sent before the share went live may arrive after the event
    # saying it did; the initial sync is over either way.
    went_live: bool = False

    @property
    def live(self) -> bool:
        return self.went_live

    @property
    def state(self) -> str | None:
        states = [link.get("state") for link in self.links.values()]
        for state in ("live", "initial", "retrying", "error", "offline"):
            if state in states:
                return state
        return states[0] if states else None

    @property
    def done(self) -> int:
        # Several peers may each send the whole share: the furthest one says how far we are.
        return max((link.get("done") or 0 for link in self.links.values()), default=0)

    @property
    def total(self) -> int | None:
        totals = [link.get("total") for link in self.links.values()]
        known = [t for t in totals if isinstance(t, int)]
        return max(known) if known else None

    @property
    def bytes(self) -> int:
        """Bytes moved: as the batch events told, or as `/status` counts them for a link
        (which also covers batches from before the following began), whichever is more."""
        return max([self.event_bytes, *(link.get("bytes") or 0 for link in self.links.values())])

    def bytes_per_second(self, now: float | None = None) -> float | None:
        """The average rate since the first news; None until bytes moved after it."""
        if self.bytes_base is None:
            return None
        since, base = self.bytes_base
        elapsed, moved = (time.monotonic() if now is None else now) - since, self.bytes - base
        return moved / elapsed if moved > 0 and elapsed > 0 else None

    def _mark_bytes(self) -> None:
        if self.bytes_base is None:
            self.bytes_base = (time.monotonic(), self.bytes)

    def _link(self, peer: str | None, state: Any, done: Any, total: Any,
              size: Any = None) -> bool:
        key = peer or "?"
        old = self.links.get(key)
        # Events and /status snapshots interleave, and a poll answered before an event can
        # arrive after it: a count never goes back (the race behind a summary of 0 docs).
        new = {"state": state if isinstance(state, str) else None,
               "done": max(done if _count(done) else 0, (old or {}).get("done") or 0),
               "total": total if _count(total) else None,
               # A state event carries no bytes: keep what /status said.
               "bytes": size if _count(size) else (old or {}).get("bytes", 0)}
        self.links[key] = new
        self._mark_bytes()
        self.went_live |= new["state"] == "live"
        if old is None or new["done"] > (old.get("done") or 0) or new["state"] != old["state"]:
            self.last_progress = time.monotonic()
            return True
        return False

    def on_event(self, event: Event) -> bool:
        """Take in one event; True when the picture changed."""
        if event.share != self.share:
            return False
        data = event.data
        if event.type == "sync.state":
            return self._link(event.peer, data.get("state"), data.get("done"),
                              data.get("total"))
        if event.type in ("sync.batch_received", "sync.batch_sent"):
            if event.type == "sync.batch_received":
                count = data.get("written", data.get("docs", 0))
                self.docs += count if isinstance(count, int) else 0
            size = data.get("bytes", 0)
            self._mark_bytes()
            self.event_bytes += size if _count(size) else 0
            self.last_progress = time.monotonic()
            return True
        return False

    def on_status(self, status: dict[str, Any]) -> bool:
        """Take in a `/status` answer; True when the picture changed."""
        changed = False
        for share in status.get("shares") or []:
            if not isinstance(share, dict) or share.get("name") != self.share:
                continue
            for link in share.get("peers") or []:
                if isinstance(link, dict):
                    done = link.get("done")
                    if done is None:  # a node that counts each direction apart
                        done = sum(n for n in (link.get("sent"), link.get("received"))
                                   if isinstance(n, int))
                    changed |= self._link(link.get("peer"), link.get("state"), done,
                                          link.get("total"), link.get("bytes"))
        return changed

    def summary(self, reason: str) -> SyncSummary:
        return SyncSummary(self.share, self.live, self.state, self.done, self.total,
                           self.docs, self.bytes, round(time.monotonic() - self.started, 3),
                           reason)


def _count(value: Any) -> bool:
    """Is `value` a count (a non-negative int, not a bool)?"""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _Percent(ProgressColumn):
    """The share done, once the total is known (rich would show 0% without one)."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.percentage:>3.0f}%" if task.total else "", style="progress.percentage")


class _Bytes(ProgressColumn):
    """Bytes moved and their average rate, once batches report them."""

    def render(self, task: Task) -> Text:
        moved, rate = task.fields.get("moved") or 0, task.fields.get("rate")
        if not moved:
            return Text("")
        return Text(fmt_bytes(moved) + (f" ({fmt_bytes(rate)}/s)" if rate else ""),
                    style="progress.download")


class _Eta(TimeRemainingColumn):
    """`ETA h:mm:ss` once the total is known."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        remaining = super().render(task)
        return Text("ETA ", style=remaining.style) + remaining


class _DocsRate(ProgressColumn):
    """Documents per second, as rich measures the bar's progress."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f} docs/s" if task.speed else "", style="cyan")


class _Display:
    """A rich progress bar on a terminal; silence elsewhere (the summary line comes last)."""

    def __init__(self, share: str, file: TextIO):
        self.share = share
        self.file = file
        self.progress: Progress | None = None
        if file.isatty():
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), _Percent(),
                MofNCompleteColumn(), TextColumn("docs"), _DocsRate(), _Bytes(), _Eta(),
                console=Console(file=file), transient=True)
            self.progress.start()
            self.task = self.progress.add_task(f"{share} (connecting)", total=None, moved=0,
                                               rate=None)

    def update(self, tracker: SyncTracker) -> None:
        if self.progress is None:
            return
        self.progress.update(self.task, description=f"{tracker.share} ({tracker.state or '…'})",
                             completed=tracker.done, total=tracker.total,
                             moved=tracker.bytes, rate=tracker.bytes_per_second())

    def listening(self) -> None:
        """Ctrl-C is taken from now on: say what it does (the bar shows it on a terminal)."""
        if self.progress is None:
            self.file.write(f"watching {self.share}'s sync (Ctrl-C stops watching; the sync "
                            "goes on)\n")
            self.file.flush()

    def finish(self, summary: SyncSummary) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.file.write(summary.line() + "\n")
        self.file.flush()


async def follow_sync(target: ApiTarget, share: str, *, timeout: float | None = None,
                      stall_timeout: float = STALL_TIMEOUT_S, file: TextIO | None = None,
                      poll: float = POLL_S, handle_sigint: bool = False) -> SyncSummary:
    """Follow `share`'s sync on the node at `target` until it is live, `timeout` seconds
    pass, or nothing moves for `stall_timeout` seconds (or Ctrl-C, with `handle_sigint`).
    Shows a progress bar when `file` (default stderr) is a terminal; one summary line at
    the end either way. Runs on trio."""
    import httpx
    import trio

    file = file if file is not None else sys.stderr
    tracker = SyncTracker(share)
    display = _Display(share, file)
    reason = "timeout"

    async def watch_events(client) -> None:
        def on_event(event: Event) -> None:
            if tracker.on_event(event):
                display.update(tracker)

        # Without /events (or while it is away) the status polling carries on alone.
        await follow_events(client, target, on_event, lambda *_: None, share=share,
                            recent=HISTORY, retry=poll, refused_retry=poll)

    async def poll_status(client) -> None:
        while True:
            try:
                if tracker.on_status(await fetch_status(client, target)):
                    display.update(tracker)
            except PlugshareError:
                pass  # offline or refused for now: the deadline decides when to stop
            await trio.sleep(poll)

    async def stop_on_sigint(cancel_scope, task_status=trio.TASK_STATUS_IGNORED) -> None:
        nonlocal reason
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            task_status.started()
            display.listening()
            async for _ in signals:
                reason = "interrupted"
                cancel_scope.cancel()

    try:
        with trio.move_on_after(timeout if timeout is not None else float("inf")):
            async with httpx.AsyncClient(timeout=httpx.Timeout(5.0)) as client:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch_events, client)
                    nursery.start_soon(poll_status, client)
                    if handle_sigint:
                        await nursery.start(stop_on_sigint, nursery.cancel_scope)
                    while reason != "interrupted":
                        if tracker.live:
                            reason = "live"
                            break
                        if time.monotonic() - tracker.last_progress > stall_timeout:
                            reason = "stalled"
                            break
                        await trio.sleep(min(0.05, poll))
                    nursery.cancel_scope.cancel()
    except* KeyboardInterrupt:  # Ctrl-C before the handler above was listening
        reason = "interrupted"
    finally:
        summary = tracker.summary(reason)
        display.finish(summary)
    return summary


def follow_initial_sync(where: Home | ApiTarget, share: str, *, timeout: float | None = None,
                        stall_timeout: float = STALL_TIMEOUT_S,
                        file: TextIO | None = None) -> SyncSummary:
    """`follow_sync` for synchronous callers (the command line): blocks until the share is
    live, or the timeout, or a stall, or Ctrl-C (which only stops the showing: the node
    goes on syncing)."""
    import trio

    target = where if isinstance(where, ApiTarget) else ApiTarget.of_home(where)
    in_main = threading.current_thread() is threading.main_thread()
    return trio.run(lambda: follow_sync(target, share, timeout=timeout,
                                        stall_timeout=stall_timeout, file=file,
                                        handle_sigint=in_main))
