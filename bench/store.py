"""Store benchmark (a script, not a test):

    python bench/store.py [--docs N] [--batch B] [--file-mb M] [--couchdb-url URL] [--clients]

For each backend (SQLite in a temporary file; CouchDB as a database on a pouchdb-server the
script starts), with N documents of about 1 KB:
  - put/s: `put()` one by one (new_edits=True, the store makes each revision);
  - get/s: `get()` one by one;
  - bulk docs/s: `bulk_docs(new_edits=False)` in batches of B into an empty store (the
    replication write path; durable when each call returns).
  - an incoming file of M MiB as replication writes it: its chunks staged 32 at a time
    (`stage_chunks`), the revision written from them (`put_staged`), then released: MB/s.
Goal: SQLite bulk >= 20,000 docs/s and >= 5x the CouchDB backend. `--couchdb-url` runs the
CouchDB backend against a server of your own (e.g. Apache CouchDB) instead.

With --clients it also times the HTTP clients considered for the CouchDB backend on the same
raw work against the same server: couchdb-python (synchronous, run in trio worker threads),
httpx.AsyncClient, and httpcore's async pool (httpx's transport, used directly), with the
CPU time each spends per request in this process (the server's time excluded).
"""

from __future__ import annotations

import os.path
import sys

# bench/ holds a `token.py`, which would shadow the standard library's `token` module for
# anything importing it (inspect, tokenize...): take bench/ off the import path first.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import trio  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from plugshare.store.attachments import CHUNK_SIZE, digest_of  # noqa: E402
from plugshare.store.base import Store  # noqa: E402
from plugshare.store.couchdb import CouchDBStore  # noqa: E402
from plugshare.store.revtree import history_of  # noqa: E402
from plugshare.store.sqlite import SQLiteStore  # noqa: E402
from tests.support.pouchdb import running_pouchdb_server  # noqa: E402

BODY = "x" * 1000  # with the id and JSON framing, about 1 KB per document
_db_names = itertools.count()


def doc_id(i: int) -> str:
    return f"doc-{i:06d}"


def replicated_doc(i: int) -> dict:
    """A generation-1 revision as replication delivers it."""
    rev = "1-" + hashlib.md5(f"bench {i}".encode()).hexdigest()
    return {"_id": doc_id(i), "_rev": rev, "_revisions": history_of((rev,)), "body": BODY}


async def timed(work: Callable[[], Awaitable[None]]) -> float:
    start = time.perf_counter()
    await work()
    return time.perf_counter() - start


# -- the stores -------------------------------------------------------------------------


async def bench_store(open_store: Callable[[], Awaitable[Store]], docs: int, batch: int) -> dict:
    store = await open_store()
    try:
        async def puts():
            for i in range(docs):
                await store.put({"_id": doc_id(i), "body": BODY})

        async def gets():
            for i in range(docs):
                await store.get(doc_id(i))

        put_s, get_s = await timed(puts), await timed(gets)
    finally:
        await store.aclose()

    store = await open_store()  # empty again: replicated docs are new
    try:
        async def bulk():
            for start in range(0, docs, batch):
                results = await store.bulk_docs(
                    [replicated_doc(i) for i in range(start, min(start + batch, docs))],
                    new_edits=False,
                )
                assert all(r.get("ok") for r in results), results[:3]

        bulk_s = await timed(bulk)
    finally:
        await store.aclose()
    return {"put/s": docs / put_s, "get/s": docs / get_s, "bulk docs/s": docs / bulk_s}


async def bench_file(open_store: Callable[[], Awaitable[Store]], megabytes: int) -> dict:
    """An incoming file transfer: stage, write the revision, release; MB/s of each."""
    data = os.urandom(megabytes * 1024 * 1024)
    pieces = [data[i:i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]
    md5 = digest_of(hashlib.md5(data))
    store = await open_store()
    try:
        staged: list[bytes] = []

        async def stage():
            for start in range(0, len(pieces), 32):
                staged.extend(await store.stage_chunks(pieces[start:start + 32]))

        async def write():
            rev = "1-" + hashlib.md5(b"bench file").hexdigest()
            await store.put_staged(
                {"_id": "file", "_rev": rev, "_revisions": history_of((rev,)),
                 "_attachments": {"f.bin": {"follows": True, "revpos": 1, "digest": md5,
                                            "length": len(data),
                                            "content_type": "application/octet-stream"}}},
                {"f.bin": staged}, digests={"f.bin": md5})

        async def release():
            await store.release_chunks(staged)

        times = [await timed(stage), await timed(write), await timed(release)]
    finally:
        await store.aclose()
    return {"file: stage MB/s": megabytes / times[0], "revision MB/s": megabytes / times[1],
            "release s": times[2], "overall MB/s": megabytes / sum(times)}


# -- the HTTP clients, on the same raw work -------------------------------------------------


async def bench_couchdb_python(url: str, docs: int, batch: int) -> dict:
    import couchdb

    server = couchdb.Server(url)
    db = await trio.to_thread.run_sync(server.create, f"client-cp-{next(_db_names)}")

    async def puts():
        for i in range(docs):
            await trio.to_thread.run_sync(db.save, {"_id": doc_id(i), "body": BODY})

    async def gets():
        for i in range(docs):
            await trio.to_thread.run_sync(db.get, doc_id(i))

    async def bulk():
        target = await trio.to_thread.run_sync(server.create, f"client-cp-{next(_db_names)}")
        for start in range(0, docs, batch):
            chunk = [replicated_doc(i) for i in range(start, min(start + batch, docs))]
            await trio.to_thread.run_sync(lambda: target.update(chunk, new_edits=False))

    return await _rates(puts, gets, bulk, docs)


async def bench_httpx(url: str, docs: int, batch: int) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        name = f"client-hx-{next(_db_names)}"
        (await client.put(f"/{name}")).raise_for_status()

        async def puts():
            for i in range(docs):
                answer = await client.put(f"/{name}/{doc_id(i)}", json={"body": BODY})
                answer.raise_for_status()

        async def gets():
            for i in range(docs):
                answer = await client.get(f"/{name}/{doc_id(i)}")
                answer.raise_for_status()
                answer.json()

        async def bulk():
            target = f"client-hx-{next(_db_names)}"
            (await client.put(f"/{target}")).raise_for_status()
            for start in range(0, docs, batch):
                chunk = [replicated_doc(i) for i in range(start, min(start + batch, docs))]
                answer = await client.post(
                    f"/{target}/_bulk_docs", json={"docs": chunk, "new_edits": False}
                )
                answer.raise_for_status()

        return await _rates(puts, gets, bulk, docs)


async def bench_httpcore(url: str, docs: int, batch: int) -> dict:
    import httpcore

    headers = [(b"Content-Type", b"application/json")]

    async def call(pool, method, path, body=None):
        content = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        answer = await pool.request(method, url + path, headers=headers, content=content)
        assert answer.status < 400, answer.content
        return json.loads(answer.content)

    async with httpcore.AsyncConnectionPool() as pool:
        name = f"client-hc-{next(_db_names)}"
        await call(pool, "PUT", f"/{name}")

        async def puts():
            for i in range(docs):
                await call(pool, "PUT", f"/{name}/{doc_id(i)}", {"body": BODY})

        async def gets():
            for i in range(docs):
                await call(pool, "GET", f"/{name}/{doc_id(i)}")

        async def bulk():
            target = f"client-hc-{next(_db_names)}"
            await call(pool, "PUT", f"/{target}")
            for start in range(0, docs, batch):
                chunk = [replicated_doc(i) for i in range(start, min(start + batch, docs))]
                body = {"docs": chunk, "new_edits": False}
                await call(pool, "POST", f"/{target}/_bulk_docs", body)

        return await _rates(puts, gets, bulk, docs)


async def _rates(puts, gets, bulk, docs: int) -> dict:
    cpu = time.process_time()  # this process only (worker threads included), not the server
    put_s = await timed(puts)
    get_s = await timed(gets)
    cpu = time.process_time() - cpu
    bulk_s = await timed(bulk)
    return {
        "put/s": docs / put_s,
        "get/s": docs / get_s,
        "bulk docs/s": docs / bulk_s,
        "client CPU µs/request": cpu / (2 * docs) * 1e6,
    }


# -- main -----------------------------------------------------------------------------------


def table(title: str, rows: dict[str, dict]) -> Table:
    out = Table(title=title)
    out.add_column("")
    columns = list(next(iter(rows.values())))
    for column in columns:
        out.add_column(column, justify="right")
    for name, rates in rows.items():
        out.add_row(name, *(f"{rates[c]:,.2f}" if rates[c] < 10 else f"{rates[c]:,.0f}"
                            for c in columns))
    return out


async def main(args: argparse.Namespace, couchdb_url: str, tmp: Path) -> None:
    console = Console()
    docs, batch = args.docs, args.batch
    sqlite_files = (tmp / f"store-{i}.sqlite" for i in itertools.count())
    rows = {
        "sqlite": await bench_store(lambda: SQLiteStore.open(next(sqlite_files)), docs, batch),
        "couchdb": await bench_store(
            lambda: CouchDBStore.open(couchdb_url, f"bench-{next(_db_names)}"), docs, batch
        ),
    }
    console.print(table(f"Store backends: {docs:,} docs of ~1 KB, bulk batches of {batch}", rows))
    sqlite_bulk, couch_bulk = rows["sqlite"]["bulk docs/s"], rows["couchdb"]["bulk docs/s"]
    console.print(
        f"goal sqlite bulk >= 20,000 docs/s: {'met' if sqlite_bulk >= 20_000 else 'MISSED'} "
        f"({sqlite_bulk:,.0f}); sqlite >= 5x couchdb: "
        f"{'met' if sqlite_bulk >= 5 * couch_bulk else 'MISSED'} ({sqlite_bulk / couch_bulk:.1f}x)"
    )
    if args.file_mb:
        files = {
            "sqlite": await bench_file(lambda: SQLiteStore.open(next(sqlite_files)), args.file_mb),
            "couchdb": await bench_file(
                lambda: CouchDBStore.open(couchdb_url, f"bench-{next(_db_names)}"), args.file_mb),
        }
        console.print(table(f"An incoming file of {args.file_mb} MiB", files))
    if args.clients:
        clients = {
            "couchdb-python (threads)": await bench_couchdb_python(couchdb_url, docs, batch),
            "httpx.AsyncClient": await bench_httpx(couchdb_url, docs, batch),
            "httpcore pool (used)": await bench_httpcore(couchdb_url, docs, batch),
        }
        console.print(table("HTTP clients against pouchdb-server, raw requests", clients))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10_000, help="documents per run")
    parser.add_argument("--batch", type=int, default=500, help="docs per bulk_docs call")
    parser.add_argument("--file-mb", type=int, default=64,
                        help="size of the incoming file (0: none)")
    parser.add_argument("--couchdb-url", help="a CouchDB of your own (default: pouchdb-server)")
    parser.add_argument("--clients", action="store_true", help="also compare HTTP clients")
    arguments = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = arguments.couchdb_url or stack.enter_context(running_pouchdb_server())
        tmp_dir = stack.enter_context(tempfile.TemporaryDirectory())
        trio.run(main, arguments, url.rstrip("/"), Path(tmp_dir))
