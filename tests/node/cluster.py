"""Several real nodes for sync tests and benchmarks: `plugshare init` + `plugshare run` in
subprocesses on loopback, driven through their local API (and the command line where the
command line itself is what is being shown).

- `Cluster(root)` makes nodes (`add`), and stops them all at `close`.
- `ClusterNode` is one node's home: `start`, `stop` (SIGTERM, or SIGKILL with `kill`),
  document calls over its API, `cli` / `cli_json` for the real command line. Its peer port is
  fixed at init, so a restarted node comes back where its peers last saw it (as a real node
  with a configured port does).
- `share_between(owner, members, ...)` makes a share and has each member join it.
- `wait_until(predicate, timeout, what)` polls with a bounded deadline: the only way a test
  waits for something to happen.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import pytest

from tests.node.conftest import RunningNode, init_node, plugshare, start_node
from tests.support.ports import free_loopback_port

T = TypeVar("T")

# Seconds any single wait_until may take before the test fails: a deadline, not a speed
# target (a passing test never waits it out), so generous: the suite runs on several workers
# on a machine that others may load too.
DEFAULT_TIMEOUT = 90.0
POLL_INTERVAL = 0.05


class ApiError(Exception):
    """A node's API answered with an error status."""

    def __init__(self, status: int, body: Any):
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body = status, body


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (see tests/support/ports.py)."""
    return free_loopback_port()


class Loopback:
    """Where a node runs unless told otherwise: this host's network, its peer listener on
    loopback. Another place (tests/support/netlab.py's `Host`: a network namespace) gives
    the same four things."""

    peer_host = "127.0.0.1"
    command_prefix: tuple[str, ...] = ()  # how to run a program there

    def http_transport(self) -> httpx.BaseTransport | None:
        """How the test process reaches the node's API there (None: directly)."""
        return None

    def free_port(self) -> int:
        return free_port()


LOOPBACK = Loopback()


def wait_until(predicate: Callable[[], T], timeout: float = DEFAULT_TIMEOUT, *,
               what: str = "the condition", interval: float = POLL_INTERVAL) -> T:
    """Poll `predicate` until it returns a truthy value, and return that value. Fails the
    test (AssertionError naming `what` and the last value seen) after `timeout` seconds.
    A node that is (re)starting may refuse connections meanwhile: that counts as not yet."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except httpx.TransportError as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                 f"last seen: {_short(last)}")
        time.sleep(interval)


def _short(value: Any, limit: int = 400) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class ClusterNode:
    """One node of a cluster: its home, and its process while it runs."""

    def __init__(self, home: Path, name: str, peer_port: int, node_id: str,
                 place: Any = LOOPBACK):
        self.home = home
        self.name = name
        self.peer_port = peer_port
        self.node_id = node_id
        self.place = place  # where it runs: `LOOPBACK`, or a netlab `Host`
        self.running: RunningNode | None = None
        self._http: httpx.Client | None = None

    def __repr__(self) -> str:
        return f"<node {self.name} {'running' if self.running else 'stopped'}>"

    # -- process ------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.running is not None, f"node {self.name} is not running"
        return self.running.process.pid

    def start(self) -> ClusterNode:
        assert self.running is None, f"node {self.name} is already running"
        self.running = start_node(self.home, command_prefix=self.place.command_prefix)
        self._http = httpx.Client(
            base_url=self.running.api_url, timeout=30.0,
            transport=self.place.http_transport(),
            headers={"Authorization": f"Bearer {self.running.credential}"},
        )
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop the node (SIGTERM: a clean stop) and return its exit code."""
        if self.running is None:
            return 0
        code = self.running.stop(sig)
        self.running = None
        if self._http is not None:
            self._http.close()
            self._http = None
        return code

    def kill(self) -> int:
        """SIGKILL: no chance to flush or close anything."""
        return self.stop(signal.SIGKILL)

    def log(self) -> str:
        try:
            return (self.home / "node.log").read_text()
        except FileNotFoundError:
            return ""

    # -- the local API --------------------------------------------------------------------

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        assert self._http is not None, f"node {self.name} is not running"
        response = self._http.request(method, path, **kwargs)
        body = response.json()
        if response.is_error:
            raise ApiError(response.status_code, body)
        return body

    def put(self, doctype: str, body: dict, doc_id: str, rev: str | None = None) -> str:
        """Create or update a document; its new rev."""
        if rev is not None:
            body = {**body, "_rev": rev}
        return self.api("PUT", f"/data/{quote(doctype, safe='')}/{quote(doc_id, safe='')}",
                        json=body)["rev"]

    def put_many(self, doctype: str, docs: Iterable[tuple[str, dict]], *,
                 concurrency: int = 8) -> dict[str, str]:
        """Create many documents through the API, a few requests at a time; id -> rev."""
        docs = list(docs)
        with ThreadPoolExecutor(concurrency) as pool:
            revs = list(pool.map(lambda item: self.put(doctype, item[1], item[0]), docs))
        return {doc_id: rev for (doc_id, _), rev in zip(docs, revs)}

    def get(self, doc_id: str, *, conflicts: bool = False) -> dict | None:
        """The winning revision of a live document, or None if it is missing or deleted."""
        try:
            doc = self.api("GET", f"/docs/{quote(doc_id, safe='')}",
                           params={"conflicts": "true"} if conflicts else None)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return None if doc.get("_deleted") else doc

    def delete(self, doc_id: str, rev: str) -> str:
        return self.api("DELETE", f"/docs/{quote(doc_id, safe='')}", params={"rev": rev})["rev"]

    def revs(self, doctype: str | None = None) -> dict[str, str]:
        """id -> winning rev of every live document (of `doctype`) this node holds."""
        body = self.api("GET", "/docs/", params={"doctype": doctype} if doctype else None)
        return {doc["_id"]: doc["_rev"] for doc in body["docs"] if not doc.get("_deleted")}

    def status(self) -> dict:
        return self.api("GET", "/status")

    def share(self, name: str) -> dict:
        return self.api("GET", f"/shares/{quote(name, safe='')}")

    def peer_connected(self, other: ClusterNode) -> bool:
        return any(p["id"] == other.node_id and p["connected"]
                   for p in self.api("GET", "/peers")["peers"])

    # -- the command line -------------------------------------------------------------------

    def cli(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        return plugshare(self.home, *args, command_prefix=self.place.command_prefix, **kwargs)

    def cli_ok(self, *args: str) -> str:
        """Run a command that must succeed; its stdout."""
        done = self.cli(*args)
        assert done.returncode == 0, f"`plugshare {' '.join(args)}` on {self.name}: {done.stderr}"
        return done.stdout

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli_ok("--json", *args))


class Cluster:
    """Nodes made under one directory; `close` stops every one still running."""

    def __init__(self, root: Path):
        self.root = root
        self.nodes: list[ClusterNode] = []

    def add(self, name: str, *init_args: str, start: bool = True,
            place: Any = LOOPBACK) -> ClusterNode:
        """`plugshare init` a node named `name` (peer port fixed, API port free), then run it.
        `init_args` go to init, e.g. ("--store", "couchdb", "--couchdb-url", url); `place`
        is where it runs (a netlab `Host`: in that namespace, listening on its address)."""
        home = self.root / name
        port = place.free_port()
        created = init_node(home, "--json", "--name", name, "--peer-listen",
                            f"{place.peer_host}:{port}", *init_args,
                            command_prefix=place.command_prefix)
        node = ClusterNode(home, name, port, json.loads(created.stdout)["node_id"], place)
        self.nodes.append(node)
        return node.start() if start else node

    def close(self) -> None:
        for node in self.nodes:
            node.stop()

    def logs(self) -> str:
        return "\n".join(f"===== {n.name} =====\n{n.log()[-4000:]}" for n in self.nodes)


def share_between(owner: ClusterNode, members: Iterable[ClusterNode], *, name: str,
                  doctype: str, selector: dict | None = None, encrypt: bool = False,
                  read_only: Iterable[ClusterNode] = ()) -> dict:
    """`share create` on `owner`, then for each member `share invite` there and `share accept`
    on the member (read-only for those in `read_only`). Returns the owner's view of the share."""
    create = ["share", "create", name, "--doctype", doctype]
    if selector is not None:
        create += ["--selector", json.dumps(selector)]
    if encrypt:
        create.append("--encrypt")
    owner.cli_json(*create)
    read_only = {id(node) for node in read_only}
    for member in members:
        invite = ["share", "invite", name] + (["--read-only"] if id(member) in read_only else [])
        code = owner.cli_json(*invite)["code"]
        member.cli_json("share", "accept", "--no-progress", code)
    return owner.share(name)


@pytest.fixture
def cluster(tmp_path):
    """A `Cluster` under the test's tmp dir. The nodes' logs are printed at teardown: pytest
    shows them for a failing test only."""
    made = Cluster(tmp_path)
    try:
        yield made
    finally:
        made.close()
        print(made.logs())
