"""A real PouchDB as a test client: the npm `pouchdb` package under the machine's Node.js,
driven from trio.

    async with pouchdb_puppet(tmp_path / "pouch") as pouch:
        await pouch.put({"_id": "a", "n": 1})
        result = await pouch.replicate_from(couch_url(api_url, "io.notes", credential))
        assert result["docs_written"] == 3

The puppet (`pouchdb_client.js`) keeps one local PouchDB in LevelDB under the directory the
test gives, so a second puppet on the same directory finds the same data and checkpoints.
Every command waits `timeout` seconds at most for its answer; a failure names the command and
shows the end of the puppet's stderr. Live replications (`start_live`) stream PouchDB's events
back; `wait_event` waits for one that matches.

`pouchdb` is installed on first use into the repo's ignored `.cache/pouchdb-client/`, under a
lock (see `tests.support.pouchdb.ensure_npm_package`); `python -m tests.support.pouchdb
--install` installs it with pouchdb-server.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import trio

from tests.support.pouchdb import REPO_ROOT, PouchDBServerError, ensure_npm_package

POUCHDB_VERSION = "9.0.0"
CLIENT_INSTALL_DIR = REPO_ROOT / ".cache" / "pouchdb-client"
PUPPET_JS = Path(__file__).with_name("pouchdb_client.js")
ANSWER_TIMEOUT = 60.0  # seconds; a one-shot replication of a few hundred docs on a loaded machine
STDERR_TAIL = 3000

T = TypeVar("T")


class PuppetError(RuntimeError):
    """The puppet answered a command with an error (PouchDB's, in `error`), or did not answer."""

    def __init__(self, message: str, error: dict | None = None):
        super().__init__(message)
        self.error = error or {}

    @property
    def status(self) -> int | None:
        return self.error.get("status")


def ensure_client_installed(install_dir: Path = CLIENT_INSTALL_DIR) -> Path:
    """Install the npm `pouchdb` package unless it is there already; return its main module."""
    return ensure_npm_package(
        install_dir, f"pouchdb@{POUCHDB_VERSION}",
        install_dir / "node_modules" / "pouchdb" / "lib" / "index.js",
    )


def couch_url(api_url: str, db: str, credential: str, *, user: str = "app") -> str:
    """`http://user:credential@host:port/couch/DB`: a node's CouchDB database with the
    credential in the URL, which PouchDB sends as HTTP Basic (the user name is free text)."""
    parts = urlsplit(api_url)
    return (f"{parts.scheme}://{quote(user, safe='')}:{quote(credential, safe='')}@"
            f"{parts.netloc}/couch/{quote(db, safe='')}")


class PouchPuppet:
    """One running puppet. Use through `pouchdb_puppet()`."""

    def __init__(self, process: trio.Process, stderr_path: Path, timeout: float):
        self._process = process
        self._stderr_path = stderr_path
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel] = {}
        self._events: list[dict] = []
        self._reader_done = trio.Event()
        self._handles = itertools.count(1)

    # -- PouchDB's API ------------------------------------------------------------------------

    async def info(self) -> dict:
        return await self.call("info")

    async def put(self, doc: dict) -> dict:
        return await self.call("put", doc=doc)

    async def get(self, doc_id: str, **options: Any) -> dict:
        return await self.call("get", docId=doc_id, options=options)

    async def get_or_none(self, doc_id: str, **options: Any) -> dict | None:
        try:
            return await self.get(doc_id, **options)
        except PuppetError as exc:
            if exc.status == 404:
                return None
            raise

    async def remove(self, doc_id: str, rev: str) -> dict:
        return await self.call("remove", docId=doc_id, rev=rev)

    async def bulk_docs(self, docs: list[dict], **options: Any) -> list[dict]:
        return await self.call("bulkDocs", docs=docs, options=options)

    async def all_docs(self, **options: Any) -> dict:
        return await self.call("allDocs", options=options)

    async def revs(self) -> dict[str, str]:
        """id -> winning rev of every live document in the local database."""
        rows = (await self.all_docs())["rows"]
        return {row["id"]: row["value"]["rev"] for row in rows}

    async def replicate_from(self, url: str, *, timeout: float | None = None,
                             **options: Any) -> dict:
        """One-shot pull; PouchDB's result (`docs_read`, `docs_written`, `doc_write_failures`,
        `errors`, `last_seq`; `ok` false and `error` set if it ended in an error)."""
        return await self.call("replicate", direction="from", url=url, options=options,
                               timeout=timeout)

    async def replicate_to(self, url: str, *, timeout: float | None = None,
                           **options: Any) -> dict:
        """One-shot push; like `replicate_from`."""
        return await self.call("replicate", direction="to", url=url, options=options,
                               timeout=timeout)

    async def start_live(self, kind: str, url: str, **options: Any) -> str:
        """Start a live replication, `kind` "sync" (both ways), "from" or "to"; its handle.
        Its events arrive in `events(handle)`. `back_off_ms=N` (with `retry=True`) retries
        every N ms, where PouchDB's own pause doubles up to 10 minutes."""
        handle = f"live{next(self._handles)}"
        await self.call("live", handle=handle, kind=kind, url=url, options=options)
        return handle

    async def cancel(self, handle: str) -> None:
        await self.call("cancel", handle=handle)

    # -- events of live replications ------------------------------------------------------------

    def events(self, handle: str | None = None, kind: str | None = None) -> list[dict]:
        """Events seen so far, oldest first (each {"event", "handle", "data"})."""
        return [e for e in self._events
                if (handle is None or e["handle"] == handle)
                and (kind is None or e["event"] == kind)]

    async def wait_event(self, handle: str, kind: str,
                         predicate: Callable[[Any], bool] = lambda data: True, *,
                         timeout: float | None = None) -> dict:
        """The first event of `kind` from `handle` whose data satisfies `predicate`, waiting
        for it if none came yet."""
        async def found() -> dict | None:
            return next((e for e in self.events(handle, kind) if predicate(e["data"])), None)
        return await eventually(found, timeout or self.timeout,
                                what=f"a {kind!r} event from {handle}", on_timeout=self._tail)

    # -- the line protocol -------------------------------------------------------------------

    async def call(self, cmd: str, *, timeout: float | None = None, **arguments: Any) -> Any:
        """Send one command; its answer's result, or PuppetError."""
        message_id = next(self._ids)
        send, receive = trio.open_memory_channel(1)
        self._waiting[message_id] = send
        line = json.dumps({"id": message_id, "cmd": cmd, **arguments}) + "\n"
        limit = timeout or self.timeout
        try:
            await self._process.stdin.send_all(line.encode())
            answer = None
            with trio.move_on_after(limit):
                answer = await receive.receive()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.EndOfChannel) as exc:
            raise PuppetError(f"the PouchDB puppet is gone (during `{cmd}`)\n{self._tail()}") from exc
        finally:
            self._waiting.pop(message_id, None)
        if answer is None:
            raise PuppetError(f"the PouchDB puppet did not answer `{cmd}` within {limit:.0f}s\n"
                              f"{self._tail()}")
        if "error" in answer:
            error = answer["error"] or {}
            raise PuppetError(f"`{cmd}` failed in PouchDB: {error}", error)
        return answer["ok"]

    async def _read_answers(self) -> None:
        buffer = b""
        try:
            async for chunk in self._process.stdout:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._dispatch(json.loads(line))
        finally:
            for send in self._waiting.values():
                send.close()
            self._reader_done.set()

    def _dispatch(self, message: dict) -> None:
        if "event" in message:
            self._events.append(message)
            return
        send = self._waiting.get(message.get("id"))
        if send is not None:
            send.send_nowait(message)

    def _tail(self) -> str:
        try:
            text = self._stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        return "puppet stderr (end):\n" + (text[-STDERR_TAIL:] or "(empty)")

    async def _close(self) -> None:
        with contextlib.suppress(PuppetError):
            await self.call("close", timeout=20)
        with trio.move_on_after(10):
            await self._process.wait()
        if self._process.returncode is None:
            self._process.kill()
            await self._process.wait()


@contextlib.asynccontextmanager
async def pouchdb_puppet(db_dir: Path, *, timeout: float = ANSWER_TIMEOUT
                         ) -> AsyncIterator[PouchPuppet]:
    """Run a PouchDB puppet whose local database lives in `db_dir` (made if missing)."""
    node = shutil.which("node")
    if node is None:
        raise PouchDBServerError("node is not on PATH: install Node.js (>= 18) and npm")
    main = await trio.to_thread.run_sync(ensure_client_installed)
    db_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = db_dir.with_name(db_dir.name + ".puppet.log")
    with open(stderr_path, "ab") as stderr:
        process = await trio.lowlevel.open_process(
            [node, str(PUPPET_JS), str(main), str(db_dir / "db")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
        )
    puppet = PouchPuppet(process, stderr_path, timeout)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(puppet._read_answers)
            try:
                yield puppet
            finally:
                with trio.CancelScope(shield=True):
                    await puppet._close()
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        raise group.exceptions[0] from None  # the test's own failure, not wrapped by the reader's nursery
    finally:
        if process.returncode is None:
            process.kill()


async def eventually(predicate: Callable[[], Awaitable[T]], timeout: float, *,
                     what: str = "the condition", interval: float = 0.05,
                     on_timeout: Callable[[], str] = lambda: "") -> T:
    """`tests.node.cluster.wait_until` for async predicates: poll until truthy, return it;
    AssertionError naming `what` and the last value seen after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            text = repr(last)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: "
                                 f"{text[:400]}\n{on_timeout()}")
        await trio.sleep(interval)


