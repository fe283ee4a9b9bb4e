"""CouchDB API benchmark (a script, not a test), issue #12's "Speed":

    python bench/couch.py [--docs 10000] [--bulk-docs 20000] [--samples 200] [--json FILE]

One `plugshare run` subprocess on 127.0.0.1 (embedded store, durable writes), an app with write
access to one doctype, everything through `/couch/...` with the app's credential; beside it an
in-memory pouchdb-server, measured the same way in the same run. Measures:
  - `_bulk_docs` of ~1 KB docs in batches of 1,000 (goal >= 20,000 docs/s, durable);
  - a real PouchDB (tests/support/pouchdb_client.py: npm `pouchdb` under node, LevelDB on
    disk, its default batch size) pulling --docs docs of ~1 KB in one one-shot replication,
    from the node and from pouchdb-server (goal: the node at least as fast);
  - a `_changes?feed=longpoll` follower's latency, from a PUT sent to the feed answering with
    that doc, one write at a time (--samples; goal p50 <= 2 ms).
Prints a table, then the same numbers as one JSON document (also to --json FILE).
"""

from __future__ import annotations

import importlib.util
import os.path
import sys

# bench/ holds a `token.py`, which would shadow the standard library's `token` module for
# anything importing it: take bench/ off the import path first (as bench/sync.py does).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import trio  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.node.cluster import Cluster  # noqa: E402
from tests.support.pouchdb import running_pouchdb_server  # noqa: E402
from tests.support.pouchdb_client import pouchdb_puppet  # noqa: E402


def _load_sync_bench():
    """bench/sync.py's helpers (docs of ~1 KB, percentiles, the table), not copied here."""
    spec = importlib.util.spec_from_file_location("bench_sync", os.path.join(_HERE, "sync.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_sync = _load_sync_bench()
make_docs, percentile, ms, Table = _sync.make_docs, _sync.percentile, _sync.ms, _sync.Table

DOCTYPES = {"bulk": "bench.bulk", "pull": "bench.pull", "poll": "bench.poll"}
BATCH = 1000
LONGPOLL_TIMEOUT_MS = 10_000


class Target:
    """A CouchDB-protocol server to measure: databases by name under `base` (for httpx, with
    `headers`) and under `pouch_base` (for PouchDB: the credential inside, sent as Basic)."""

    def __init__(self, label: str, base: str, pouch_base: str, headers: dict[str, str]):
        self.label, self.base, self.pouch_base = label, base, pouch_base
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(120))

    def db(self, name: str) -> str:
        return f"{self.base}/{name}"

    def close(self) -> None:
        self.http.close()


def couch_docs(n: int, prefix: str) -> list[dict]:
    return [{"_id": doc_id, **body} for doc_id, body in make_docs(n, prefix)]


def bulk_load(target: Target, db: str, docs: list[dict]) -> float:
    """`_bulk_docs` in batches of BATCH, one after another; docs/s."""
    started = time.perf_counter()
    for chunk in range(0, len(docs), BATCH):
        answer = target.http.post(f"{target.db(db)}/_bulk_docs",
                                  json={"docs": docs[chunk:chunk + BATCH]})
        answer.raise_for_status()
        failed = [row for row in answer.json() if "error" in row]
        assert not failed, f"{target.label}: _bulk_docs refused {len(failed)}: {failed[:3]}"
    return len(docs) / (time.perf_counter() - started)


def pouch_pull(target: Target, db: str, workdir: Path, n: int) -> tuple[float, dict]:
    """A fresh PouchDB pulls the whole database once; (docs/s, PouchDB's result)."""
    async def run() -> tuple[float, dict]:
        async with pouchdb_puppet(workdir, timeout=600) as pouch:
            started = time.perf_counter()
            result = await pouch.replicate_from(f"{target.pouch_base}/{db}")
            elapsed = time.perf_counter() - started
            held = (await pouch.info())["doc_count"]
        assert result.get("ok") and result["docs_written"] >= n and held >= n, \
            f"{target.label}: PouchDB holds {held} docs of {n}: {json.dumps(result)[:500]}"
        return n / elapsed, result
    return trio.run(run)


def longpoll_latency(target: Target, db: str, samples: int
                     ) -> tuple[list[tuple[float, float]], str]:
    """PUT one doc, time until a longpoll follower's `_changes` answer names it; each write
    waits for the previous one to be seen. (From the write sent, from its answer received)
    in seconds, one pair per sample (the feed may answer before the writer hears back: 0);
    and how docs were written
    (a server without document PUT gets single-doc `_bulk_docs` instead, and says so)."""
    db_url = target.db(db)
    since = target.http.get(db_url).raise_for_status().json()["update_seq"]
    arrivals: dict[str, float] = {}
    seen = threading.Condition()
    stop = threading.Event()

    failure: list[BaseException] = []

    def follow() -> None:
        nonlocal since
        try:
            with httpx.Client(headers=target.http.headers,
                              timeout=LONGPOLL_TIMEOUT_MS / 1000 + 30) as http:
                while not stop.is_set():
                    answer = http.get(f"{db_url}/_changes", params={
                        "feed": "longpoll", "since": since, "timeout": LONGPOLL_TIMEOUT_MS})
                    arrived = time.perf_counter()
                    answer.raise_for_status()
                    body = answer.json()
                    with seen:
                        for change in body["results"]:
                            arrivals.setdefault(change["id"], arrived)
                        seen.notify_all()
                    since = body["last_seq"]
        except Exception as exc:  # noqa: BLE001 - handed to the measuring thread
            if not stop.is_set():  # a poll cut short by the server's stop is no failure
                with seen:
                    failure.append(exc)
                    seen.notify_all()

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    latencies = []
    body = {"title": "live", "body": os.urandom(480).hex()}
    how = "PUT /{db}/{id}"
    for i in range(samples):
        doc_id = f"poll-{target.label}-{i:05d}"
        sent = time.perf_counter()
        if how.startswith("PUT"):
            answer = target.http.put(f"{db_url}/{doc_id}", json=body)
            if i == 0 and answer.status_code in (404, 405):
                how = f"single-doc _bulk_docs (PUT /{{db}}/{{id}} answered {answer.status_code})"
                sent = time.perf_counter()
        if not how.startswith("PUT"):
            answer = target.http.post(f"{db_url}/_bulk_docs",
                                      json={"docs": [{"_id": doc_id, **body}]})
        answer.raise_for_status()
        returned = time.perf_counter()
        with seen:
            if not seen.wait_for(lambda: doc_id in arrivals or failure, timeout=30):
                raise RuntimeError(f"{target.label}: the longpoll follower never saw {doc_id}")
            if failure:
                raise RuntimeError(f"{target.label}: the longpoll follower failed") from failure[0]
        latencies.append((arrivals[doc_id] - sent, max(0.0, arrivals[doc_id] - returned)))
    stop.set()
    return latencies, how


def measure(target: Target, dbs: dict[str, str], workdir: Path, n: int, bulk_n: int,
            samples: int, table: Table, results: dict) -> None:
    """The three measures on one target; `dbs` names its databases for "bulk", "pull" and
    "poll" (each starts empty)."""
    label = target.label
    rate = bulk_load(target, dbs["bulk"], couch_docs(bulk_n, "b"))
    results[f"{label}.bulk_docs_per_s"] = round(rate)
    table.add(f"[{label}] _bulk_docs, 1 KB docs, batches of {BATCH}", f"{rate:.0f} docs/s",
              f"({bulk_n} docs" + ("; goal >= 20000, durable)" if label == "node"
                                   else "; in memory, not durable)"))

    bulk_load(target, dbs["pull"], couch_docs(n, "p"))
    pull_rate, result = pouch_pull(target, dbs["pull"], workdir / f"pouch-{label}", n)
    results[f"{label}.pouchdb_pull_docs_per_s"] = round(pull_rate)
    table.add(f"[{label}] PouchDB one-shot pull of {n} docs", f"{pull_rate:.0f} docs/s",
              f"(docs_read {result['docs_read']}; PouchDB's default batch size)")

    latencies, how = longpoll_latency(target, dbs["poll"], samples)
    results[f"{label}.longpoll_writes"] = how
    for index, start in enumerate(("sent", "answered")):
        series = [pair[index] for pair in latencies]
        p50, p99 = statistics.median(series), percentile(series, 99)
        results[f"{label}.longpoll_from_{start}_p50_ms"] = round(p50 * 1000, 2)
        results[f"{label}.longpoll_from_{start}_p99_ms"] = round(p99 * 1000, 2)
        goal = "; goal p50 <= 2 ms" if label == "node" and start == "sent" else ""
        table.add(f"[{label}] longpoll follower, write {start} -> feed answered",
                  f"p50 {ms(p50)} / p99 {ms(p99)} ms", f"({samples} writes by {how}{goal})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=10_000,
                        help="docs PouchDB pulls, besides the _bulk_docs ones (default 10000)")
    parser.add_argument("--bulk-docs", type=int, default=20_000,
                        help="docs written by _bulk_docs (default 20000)")
    parser.add_argument("--samples", type=int, default=200, help="longpoll latency samples")
    parser.add_argument("--json", type=Path, help="also write the JSON results to this file")
    args = parser.parse_args()

    table = Table()
    results: dict = {"docs": args.docs, "bulk_docs": args.bulk_docs, "samples": args.samples}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="plugshare-bench-couch-") as tmp:
        root = Path(tmp)
        cluster = Cluster(root / "nodes")
        try:
            node = cluster.add("a")
            credential = node.cli_json("app", "add", "bench", "--doctype", DOCTYPES["bulk"],
                                       "--perm", "write")["credential"]
            for doctype in (DOCTYPES["pull"], DOCTYPES["poll"]):
                node.cli_json("rule", "add", "--doctype", doctype, "--app", "bench",
                              "--perm", "write")
            api = node.running.api_url
            scheme, host = api.split("://", 1)
            target = Target("node", f"{api}/couch", f"{scheme}://bench:{credential}@{host}/couch",
                            {"Authorization": f"Bearer {credential}"})
            try:
                measure(target, DOCTYPES, root, args.docs, args.bulk_docs, args.samples,
                        table, results)
            finally:
                target.close()
        finally:
            cluster.close()

        with running_pouchdb_server() as server:
            for db in DOCTYPES:
                httpx.put(f"{server}/{db}").raise_for_status()
            target = Target("pouchdb-server", server, server, {})
            try:
                measure(target, {db: db for db in DOCTYPES}, root, args.docs, args.bulk_docs,
                        args.samples, table, results)
            finally:
                target.close()

    node_pull = results["node.pouchdb_pull_docs_per_s"]
    server_pull = results["pouchdb-server.pouchdb_pull_docs_per_s"]
    results["pull_node_over_pouchdb_server"] = round(node_pull / server_pull, 2)
    table.add("PouchDB pull: node / pouchdb-server", f"{node_pull / server_pull:.2f}x",
              "(goal >= 1.00x)")
    results["run_seconds"] = round(time.perf_counter() - started, 1)
    table.print()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
