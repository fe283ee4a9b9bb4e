"""Live sync benchmark between real nodes (a script, not a test):

    python bench/sync.py [--docs 10000[,100000]] [--samples 200] [--no-encrypted] [--no-pouchdb]

Two `plugshare run` subprocesses on 127.0.0.1 (embedded store, durable writes), a share between
them, everything through the local API. Measures, for each size N in --docs:
  - initial sync: A holds N docs of about 1 KB; docs/s from B's `POST /join` (share accept)
    to all N docs written on B (summed from B's batch events; `--probe poll` polls B's API
    for the last doc instead, which loads B), and the peak RSS (VmHWM) of each node process;
  - the same with an encrypted share (`--encrypt`): ratio to the clear run (goal >= 80%);
  - live propagation A -> B, one doc at a time (--samples): from the PUT returning on A to
    (1) B's `sync.batch_received` event (B's /events stream) and (2) the doc readable through
    B's API (polled tightly; each poll costs the node a request, so this one reads higher).
    Goal p50 <= 5 ms, p99 <= 20 ms;
  - live A -> B from the PUT being *sent* on A to the doc readable on B (what a user sees);
  - single-doc durable PUT throughput through A's API with 1, 8 and 64 concurrent clients
    (light standard-library clients, as they share the two cores), and the CPU the node, its
    token and the clients each spent per PUT;
  - side by side, PouchDB: two in-memory pouchdb-servers, the same N docs, a one-shot
    `POST /_replicate` timed, and a continuous replication's live latency (polled).
Goals on RSS: each node stays under 150 MB; initial-sync time grows linearly with N.
Prints a table.
"""

from __future__ import annotations

import os.path
import sys

# bench/ holds a `token.py`, which would shadow the standard library's `token` module for
# anything importing it (inspect, tokenize...): take bench/ off the import path first.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import queue  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import httpx  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.node.cluster import Cluster, ClusterNode, wait_until  # noqa: E402
from tests.support.pouchdb import running_pouchdb_server  # noqa: E402

DOCTYPE = "bench.notes"
RSS_LIMIT_MB = 150
BODY_HEX_BYTES = 480  # 960 hex chars: with the other fields, a doc of about 1 KB as JSON


def make_docs(n: int, prefix: str = "d") -> list[tuple[str, dict]]:
    """N docs of about 1 KB, ids in write order; bodies random (nothing compresses them)."""
    return [(f"{prefix}{i:07d}", {"title": f"note {i}", "n": i,
                                  "body": os.urandom(BODY_HEX_BYTES).hex()})
            for i in range(n)]


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM: the peak) of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


class Table:
    """Rows printed as they come and as a table at the end; `numbers` for the JSON."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []
        self.numbers: dict[str, float] = {}

    def add(self, what: str, value: str, note: str = "", **numbers: float) -> None:
        self.rows.append((what, value, note))
        self.numbers.update(numbers)
        print(f"  {what}: {value} {note}", flush=True)

    def print(self) -> None:
        width = max(len(r[0]) for r in self.rows)
        vwidth = max(len(r[1]) for r in self.rows)
        print()
        print(f"{'measure':<{width}}  {'value':>{vwidth}}  note")
        print("-" * (width + vwidth + 30))
        for what, value, note in self.rows:
            print(f"{what:<{width}}  {value:>{vwidth}}  {note}")


# -- plugshare ----------------------------------------------------------------------------


def initial_sync(root: Path, n: int, *, encrypt: bool, table: Table,
                 keep: bool = False, probe: str = "events") -> tuple[float, tuple[ClusterNode, ClusterNode, Cluster]
                                               | None]:
    """Fresh nodes A and B; A holds N docs in a share; time B's join until it holds them all.
    Returns docs/s (and the running nodes when `keep`)."""
    label = "encrypted" if encrypt else "clear"
    cluster = Cluster(root / f"{label}-{n}")
    kept = False  # handed to the caller, which closes it
    try:
        a, b = cluster.add("a"), cluster.add("b")
        create = ["share", "create", "bench", "--doctype", DOCTYPE] + (["--encrypt"] if encrypt else [])
        a.cli_json(*create)  # before the docs: an encrypted share's docs are sealed as written
        docs = make_docs(n)
        started = time.perf_counter()
        for chunk in range(0, n, 5000):
            a.put_many(DOCTYPE, docs[chunk:chunk + 5000], concurrency=8)
        load = time.perf_counter() - started
        table.add(f"[{label} N={n}] load A through its API", f"{n / load:.0f} docs/s",
                  f"({load:.1f} s, 8 requests at a time)")
        code = a.api("POST", "/shares/bench/invite", json={"read_only": False})["code"]
        last_id = docs[-1][0]

        # B's batch events count the docs as they are written (no load on B); polling the
        # last doc instead costs B a request, and its token a decision, every 5 ms.
        follower = EventFollower(b, "bench") if probe == "events" else None
        started = time.perf_counter()
        b.api("POST", "/join", json={"code": code})
        joined = time.perf_counter()
        if follower is not None:
            written, done = 0, started
            while written < n:
                done, event = follower.events.get(timeout=max(120, n / 100))
                written += event["data"]["docs"]
            follower.stop.set()
            elapsed = done - started
            assert b.get(last_id), f"{last_id} is not readable on b once all were written"
        else:
            # A pushes in changes-feed order and B writes batches in order: the last doc
            # written on A arrives last.
            wait_until(lambda: b.get(last_id), timeout=max(120, n / 100), interval=0.005,
                       what=f"{last_id} on b")
            elapsed = time.perf_counter() - started
        # Peaks now, before /status: it reads every doc to count a share's (see the report).
        memory = {node.name: memory_mb(node.pid) for node in (a, b)}
        statuses = {node.name: node.status() for node in (a, b)}
        token_memory = {name: memory_mb(st["token_pid"]) for name, st in statuses.items()
                        if st.get("token_pid")}
        count = statuses["b"]["store"]["doc_count"] if "b" in statuses else \
            b.status()["store"]["doc_count"]
        assert count == n, f"b holds {count} docs once the last one arrived, expected {n}"
        rate = n / elapsed
        table.add(f"[{label} N={n}] initial sync, accept -> all on B",
                  f"{rate:.0f} docs/s", f"({elapsed:.2f} s; join itself {ms(joined - started)} ms)")
        for node in (a, b):
            rss, peak = memory[node.name]
            table.add(f"[{label} N={n}] RSS of node {node.name}", f"{peak:.0f} MB peak",
                      f"(now {rss:.0f} MB; goal < {RSS_LIMIT_MB} MB)"
                      + ("" if peak < RSS_LIMIT_MB else "  OVER"))
            if node.name in token_memory:
                rss, peak = token_memory[node.name]
                table.add(f"[{label} N={n}] RSS of {node.name}'s token process",
                          f"{peak:.0f} MB peak", f"(now {rss:.0f} MB)")
        if keep:
            kept = True
            return rate, (a, b, cluster)
        return rate, None
    finally:
        if not kept:  # a failure too: no node process left behind
            cluster.close()


class EventFollower:
    """Follows a node's /events stream in a thread; queues (arrival time, event)."""

    def __init__(self, node: ClusterNode, share: str):
        self.events: queue.Queue[tuple[float, dict]] = queue.Queue()
        self.url = f"{node.running.api_url}/events"
        self.headers = {"Authorization": f"Bearer {node.running.credential}"}
        self.share = share
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(10):
            raise RuntimeError("the /events stream did not open")

    def _run(self) -> None:
        with httpx.stream("GET", self.url, params={"share": self.share}, headers=self.headers,
                          timeout=httpx.Timeout(10, read=None)) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                arrived = time.perf_counter()
                if self.stop.is_set():
                    return
                if not line:
                    continue
                event = json.loads(line)
                self.ready.set()  # the first line is a heartbeat, sent on subscribing
                if event["type"] == "sync.batch_received":
                    self.events.put((arrived, event))

    def drain(self) -> None:
        while not self.events.empty():
            self.events.get_nowait()


def live_latency(a: ClusterNode, b: ClusterNode, samples: int, table: Table) -> None:
    """A -> B one doc at a time: to B's batch event, and to the doc readable on B."""
    follower = EventFollower(b, "bench")
    from_return, from_send, early = [], [], 0
    for i in range(samples):
        follower.drain()
        sent = time.perf_counter()
        a.put(DOCTYPE, {"title": f"live {i}", "body": "x" * 900}, f"live-e{i:04d}")
        returned = time.perf_counter()
        arrived, _event = follower.events.get(timeout=10)
        early += arrived < returned  # B had it before A's answer reached the client
        from_return.append(max(0.0, arrived - returned))
        from_send.append(arrived - sent)
    follower.stop.set()
    table.add("live A->B: PUT returned -> batch written on B (/events)",
              f"p50 {ms(statistics.median(from_return))} / p99 {ms(percentile(from_return, 99))} ms",
              f"(goal p50 <= 5, p99 <= 20; {early} of {samples} arrived before the PUT returned)")
    table.add("live A->B: PUT sent -> batch written on B (/events)",
              f"p50 {ms(statistics.median(from_send))} / p99 {ms(percentile(from_send, 99))} ms",
              "(includes A's own write and answer)")

    to_read, sent_to_read = [], []
    for i in range(samples):
        doc_id = f"live-p{i:04d}"
        sent = time.perf_counter()
        a.put(DOCTYPE, {"title": f"live {i}", "body": "x" * 900}, doc_id)
        returned = time.perf_counter()
        while b.get(doc_id) is None:
            pass
        readable = time.perf_counter()
        to_read.append(readable - returned)
        sent_to_read.append(readable - sent)
    table.add("live A->B: PUT sent -> readable on B (polling B's API)",
              f"p50 {ms(statistics.median(sent_to_read))} / "
              f"p99 {ms(percentile(sent_to_read, 99))} ms",
              "(what a user sees; goal p50 <= 2, p99 <= 8)")
    table.add("live A->B: PUT returned -> readable on B (polling B's API)",
              f"p50 {ms(statistics.median(to_read))} / p99 {ms(percentile(to_read, 99))} ms",
              "(each poll is a full API request)")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def put_throughput(node: ClusterNode, table: Table, clients: tuple[int, ...] = (1, 8, 64),
                   seconds: float = 5.0) -> None:
    """Single-doc durable PUTs through the API, `clients` at once (one thread and one
    keep-alive connection each), for about `seconds`: docs/s, and the CPU each process spent
    per PUT. The clients share the node's two cores, so they are the standard library's
    `http.client` (a fraction of httpx's CPU per request): what they spend is not the
    node's, and it is reported beside."""
    url = urlsplit(node.running.api_url)
    headers = {"Authorization": f"Bearer {node.running.credential}",
               "Content-Type": "application/json"}
    body = json.dumps({"title": "t", "body": "x" * 900}).encode()
    token_pid = node.status().get("token_pid")
    for count in clients:
        done = [0] * count
        start = threading.Barrier(count + 1)
        deadline = [0.0]

        def client(index: int) -> None:
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60.0)
            try:
                start.wait()
                n = 0
                while time.perf_counter() < deadline[0]:
                    conn.request("PUT", f"/data/{DOCTYPE}/tp{count}-{index}-{n}", body,
                                 headers)
                    answer = conn.getresponse()
                    text = answer.read()
                    assert answer.status == 201, text
                    n += 1
                done[index] = n
            finally:
                conn.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        deadline[0] = time.perf_counter() + seconds
        cpu_before = {"node": cpu_seconds(node.pid), "client": time.process_time()}
        if token_pid:
            cpu_before["token"] = cpu_seconds(token_pid)
        started = time.perf_counter()
        start.wait()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        cpu = {"node": cpu_seconds(node.pid) - cpu_before["node"],
               "client": time.process_time() - cpu_before["client"]}
        if token_pid:
            cpu["token"] = cpu_seconds(token_pid) - cpu_before["token"]
        total = sum(done)
        per_put = ", ".join(f"{name} {1000 * spent / total:.2f}" for name, spent in cpu.items())
        table.add(f"single-doc PUTs, {count} client{'s' if count > 1 else ''}",
                  f"{total / elapsed:.0f} docs/s",
                  f"(durable; CPU ms per PUT: {per_put}; load average "
                  f"{os.getloadavg()[0]:.1f})")


# -- PouchDB, side by side ----------------------------------------------------------------


def pouchdb(n: int, samples: int, table: Table) -> None:
    docs = [{"_id": doc_id, "doctype": DOCTYPE, **body} for doc_id, body in make_docs(n)]
    with running_pouchdb_server() as source, running_pouchdb_server() as target, \
            httpx.Client(timeout=httpx.Timeout(600)) as http:
        http.put(f"{source}/src").raise_for_status()
        for chunk in range(0, n, 2000):
            http.post(f"{source}/src/_bulk_docs", json={"docs": docs[chunk:chunk + 2000]}
                      ).raise_for_status()
        started = time.perf_counter()
        answer = http.post(f"{target}/_replicate", json={
            "source": f"{source}/src", "target": f"{target}/dst", "create_target": True})
        elapsed = time.perf_counter() - started
        answer.raise_for_status()
        count = http.get(f"{target}/dst").json()["doc_count"]
        assert count == n, f"pouchdb replicated {count} docs of {n}: {answer.text[:300]}"
        table.add(f"[pouchdb N={n}] one-shot POST /_replicate", f"{n / elapsed:.0f} docs/s",
                  f"({elapsed:.2f} s; in-memory, not durable)")

        if not samples:
            return
        http.put(f"{source}/live").raise_for_status()
        http.post(f"{target}/_replicate", json={
            "source": f"{source}/live", "target": f"{target}/live", "create_target": True,
            "continuous": True}).raise_for_status()
        latencies = []
        for i in range(samples):
            http.put(f"{source}/live/l{i:04d}", json={"body": "x" * 900}).raise_for_status()
            returned = time.perf_counter()
            while http.get(f"{target}/live/l{i:04d}").status_code != 200:
                pass
            latencies.append(time.perf_counter() - returned)
        sent_latencies = []
        for i in range(samples):
            sent = time.perf_counter()
            http.put(f"{source}/live/s{i:04d}", json={"body": "x" * 900}).raise_for_status()
            while http.get(f"{target}/live/s{i:04d}").status_code != 200:
                pass
            sent_latencies.append(time.perf_counter() - sent)
        table.add("[pouchdb] live: PUT sent -> readable on B (polling)",
                  f"p50 {ms(statistics.median(sent_latencies))} / "
                  f"p99 {ms(percentile(sent_latencies, 99))} ms")
        table.add("[pouchdb] live, continuous replication (polling)",
                  f"p50 {ms(statistics.median(latencies))} / "
                  f"p99 {ms(percentile(latencies, 99))} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", default="10000",
                        help="docs per initial sync; a comma-separated list runs each size")
    parser.add_argument("--samples", type=int, default=200, help="live latency samples")
    parser.add_argument("--no-encrypted", action="store_true", help="skip the encrypted run")
    parser.add_argument("--no-pouchdb", action="store_true", help="skip PouchDB")
    parser.add_argument("--probe", choices=("events", "poll"), default="events",
                        help="how the initial sync's end is seen: B's batch events, or "
                             "polling B's API for the last doc every 5 ms (loads B)")
    parser.add_argument("--put-seconds", type=float, default=5.0,
                        help="how long each PUT throughput run (1, 8, 64 clients) lasts")
    args = parser.parse_args()
    sizes = [int(s) for s in args.docs.split(",")]

    table = Table()
    clear_rates: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="plugshare-bench-sync-") as tmp:
        root = Path(tmp)
        for index, n in enumerate(sizes):
            keep = index == 0
            rate, running = initial_sync(root, n, encrypt=False, table=table, keep=keep,
                                         probe=args.probe)
            clear_rates[n] = rate
            if running is not None:
                a, b, cluster = running
                try:
                    live_latency(a, b, args.samples, table)
                    put_throughput(a, table, seconds=args.put_seconds)
                finally:
                    cluster.close()
            if not args.no_encrypted:
                encrypted, _ = initial_sync(root, n, encrypt=True, table=table, probe=args.probe)
                table.add(f"[N={n}] encrypted / clear initial sync", f"{encrypted / rate:.0%}",
                          "(goal >= 80%)")
            if not args.no_pouchdb:
                pouchdb(n, args.samples if keep else 0, table)  # live latency: once
    if len(sizes) > 1:
        base = sizes[0]
        for n in sizes[1:]:
            # Linear growth keeps the rate: time(N)/time(base) == N/base.
            table.add(f"scaling N={base} -> N={n}", f"{clear_rates[base] / clear_rates[n]:.2f}x "
                      "time per doc", "(1.00x = linear)")
    table.print()


if __name__ == "__main__":
    main()
